"""Old call forms that keep working for a release, with a `DeprecationWarning` naming the new one."""

import functools
import warnings
from collections.abc import Callable


def config_second(config_class: type) -> Callable[[Callable], Callable]:
    """Decorator for a measurement `fn(model, config, *, tokenizer, ...)` that used to be `fn(model, tokenizer,
    config, ...)`: a call in the old order still works, and warns.

    Example:
        ```python
        >>> @config_second(EvalConfig)
        ... def evaluate(model, config, *, tokenizer, baseline=None): ...
        >>> evaluate(model, tokenizer, EvalConfig())  # DeprecationWarning; same as evaluate(model, config, tokenizer=...)
        ```
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(model, *args, **kwargs):
            if len(args) >= 2 and isinstance(args[1], config_class) and not isinstance(args[0], config_class):
                warnings.warn(
                    f"{fn.__name__}(model, tokenizer, config) is deprecated: call "
                    f"{fn.__name__}(model, config, tokenizer=tokenizer)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                tokenizer, config, *args = args
                return fn(model, config, *args, tokenizer=tokenizer, **kwargs)
            return fn(model, *args, **kwargs)

        return wrapper

    return decorate


__all__ = ["config_second"]
