"""Old call forms that keep working for a release, with a `DeprecationWarning` naming the new one."""

import functools
import warnings
from collections.abc import Callable


def config_second(
    config_class: type, old: tuple[str, ...] = ("tokenizer", "config")
) -> Callable[[Callable], Callable]:
    """Decorator for a function `fn(model, config, *, tokenizer, ...)` that used to take `old` positionally after the
    model (`fn(model, tokenizer, config)`; `generate` took `(tokenizer, prompt, config)`): a call in the old order
    still works, and warns.

    Example:
        ```python
        >>> @config_second(EvalConfig)
        ... def evaluate(model, config, *, tokenizer, baseline=None): ...
        >>> evaluate(model, tokenizer, EvalConfig())  # DeprecationWarning; same as evaluate(model, config, tokenizer=...)
        ```
    """
    position = old.index("config")

    def decorate(fn: Callable) -> Callable:
        keywords = ", ".join(f"{name}={name}" for name in old if name != "config")

        @functools.wraps(fn)
        def wrapper(model, *args, **kwargs):
            if (
                len(args) > position
                and isinstance(args[position], config_class)
                and not isinstance(args[0], config_class)
            ):
                warnings.warn(
                    f"{fn.__name__}(model, {', '.join(old)}) is deprecated: call {fn.__name__}(model, config, {keywords})",
                    DeprecationWarning,
                    stacklevel=2,
                )
                named = dict(zip(old, args))
                return fn(model, named.pop("config"), *args[len(old) :], **named, **kwargs)
            return fn(model, *args, **kwargs)

        return wrapper

    return decorate


__all__ = ["config_second"]
