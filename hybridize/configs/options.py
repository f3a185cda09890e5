"""Command-line options and recipe values read from the config dataclasses, so that an option's name, default and
help are its config field's and cannot drift from it (mergekit builds its options from its config model the same way).

A config field `calibration_docs: int = 8` documented as ``calibration_docs (`int`, *optional*, defaults to 8):
calibration blocks.`` in its class's HF-style `Args:` section becomes `--calibration-docs INTEGER` with default 8 and
that help. The field's type says how the option reads its text:

- `bool`: a flag pair, `--name/--no-name`;
- `int`, `float`, `str` (and `Literal[...]`, a `str` the config checks), each optionally `| None`: the value itself;
- `int | str` (`DistillConfig.tokens`, "2M"): the text, which the config parses;
- `tuple[...]`: comma-separated items (`--attn-layers 1,3`), or with `repeat` the option repeated (`--stop`);
- `dict`: `KEY=VALUE`, repeatable; a VALUE that reads as JSON (`64`, `0.5`, `true`) is that value, else the text.

`config_command` turns a command function taking `config: SomeConfig` into one taking the config's fields as options
(for typer, which reads `__signature__` and `__annotations__`), and builds the config from them before the command
body runs, so that a bad value fails before the command imports anything heavy (`tests/test_fast_cli.py`). The
command's own parameters (the model, `--output`, runtime options) are its declared extras. `coerce` is what a recipe
step's YAML values go through (`hybridize.pipeline`).

Only the standard library is imported at the top (typer when a command is declared): `hybridize.pipeline` reads it.
"""

import dataclasses
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..errors import ConfigError

_ENTRY = re.compile(r"^(\w+) \(`.*?\):\s*(.*)$")  # name (`type`, *optional*, defaults to `(1,)`): help
_PARSERS = {int: (int, "integers"), float: (float, "numbers"), str: (str, "names")}


@dataclass(frozen=True)
class ConfigField:
    """One field of a config as the command line and recipes see it.

    Args:
        name (`str`): the field's name.
        annotation (`Any`): its type, resolved (`int | None`, `tuple[int, ...]`, ...).
        default (`Any`): its default; `dataclasses.MISSING` for a required field.
        help (`str`): its text in the class's `Args:` section, backticks removed.
    """

    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def kind(self) -> str:
        """`"flag"`, `"list"`, `"mapping"`, `"text"` (`int | str`: the config parses it) or `"value"`."""
        arms = _arms(self.annotation)
        if arms == [bool]:
            return "flag"
        if any(arm is tuple or typing.get_origin(arm) is tuple for arm in arms):
            return "list"
        if any(arm is dict or typing.get_origin(arm) is dict for arm in arms):
            return "mapping"
        if len([arm for arm in arms if arm is not type(None)]) > 1:
            return "text"
        return "value"


def field_help(cls: type) -> dict[str, str]:
    """The help of each field documented in the `Args:` section of `cls`'s docstring (HF format), on one line.

    Example: `field_help(ConvertConfig)["calibration_docs"]` is `"calibration blocks."`
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Args:" not in (line.strip() for line in lines):
        return {}
    start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    helps, name, indent = {}, None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:  # the next section (`Example:`)
            break
        if depth == indent and (match := _ENTRY.match(line.strip())):
            name = match.group(1)
            helps[name] = match.group(2)
        elif name is not None:
            helps[name] += " " + line.strip()
    helps = {key: text.replace("`", "").strip() for key, text in helps.items()}
    return {key: text[:1].upper() + text[1:] for key, text in helps.items()}


@functools.cache
def config_fields(cls: type) -> dict[str, ConfigField]:
    """Every field of the config dataclass `cls`, in order, with its resolved type, default and documented help."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    fields = {}
    for field in dataclasses.fields(cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        fields[field.name] = ConfigField(field.name, hints[field.name], default, helps.get(field.name, ""))
    return fields


def coerce(cls: type, values: dict) -> dict:
    """Recipe values (YAML) as `cls` takes them: a list where the field is a tuple becomes a tuple."""
    fields = config_fields(cls)
    return {
        key: tuple(value) if isinstance(value, list) and key in fields and fields[key].kind == "list" else value
        for key, value in values.items()
    }


def parse_option(field: ConfigField, value: Any, option: str) -> Any:
    """The value of `field` from what its option gave (see the module docstring); `None` is the option left out."""
    if value is None:
        return None
    if field.kind == "mapping":
        return key_values(value, option)
    if field.kind != "list":
        return value
    if isinstance(value, (list, tuple)):  # a repeated option
        return tuple(value)
    return comma_list(value, option, _list_arm(field.annotation))


def comma_list(text: str, option: str, item: type = str) -> tuple:
    """`"1,3,5"` as `(1, 3, 5)` (items of type `item`: int, float or str); `ConfigError` naming `option` otherwise."""
    parse, plural = _PARSERS.get(item, (str, "items"))
    try:
        return tuple(parse(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated {plural}, got {text!r}") from None


def key_values(pairs: list[str], option: str) -> dict:
    """`KEY=VALUE` texts as a dict; a VALUE that reads as JSON (`64`, `0.5`, `true`, `null`) is that value, any other
    is the text itself."""
    result = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} takes KEY=VALUE, e.g. {option} chunk_size=32; got {pair!r}")
        try:
            result[key.strip()] = json.loads(text)
        except ValueError:
            result[key.strip()] = text
    return result


def option_parameters(
    cls: type,
    *,
    names: dict[str, tuple[str, ...]] | None = None,
    arguments: tuple[str, ...] = (),
    repeat: tuple[str, ...] = (),
) -> list[inspect.Parameter]:
    """One keyword parameter per field of `cls`, annotated for typer with the option (or, for a field in `arguments`,
    the positional argument) that gives it.

    Args:
        cls (`type`): the config dataclass.
        names (`dict[str, tuple[str, ...]]`, *optional*): option names of a field where they are not
            `--field-name` (`{"mixer_init": ("--init", "--mixer-init")}`); a flag's as `"--on/--off"`.
        arguments (`tuple[str, ...]`, *optional*): required fields given as positional arguments (`REPO_ID`).
        repeat (`tuple[str, ...]`, *optional*): tuple fields given by repeating the option instead of commas.
    """
    import typer

    names = names or {}
    parameters = []
    for field in config_fields(cls).values():
        text = field.help
        if field.name in arguments:
            info = typer.Argument(metavar=field.name.upper(), help=text)
            annotation, default = str, inspect.Parameter.empty
        else:
            annotation, default, hint, metavar = _option_type(field, repeat=field.name in repeat)
            decls = names.get(field.name, ())
            if field.kind == "flag" and not decls:
                decls = (f"--{_kebab(field.name)}/--no-{_kebab(field.name)}",)
            info = typer.Option(*decls, help=f"{text} {hint}".strip(), metavar=metavar)
            if field.required:
                default = inspect.Parameter.empty
        parameters.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=typing.Annotated[annotation, info],
            )
        )
    return parameters


def config_command(
    cls: type,
    *,
    extras: tuple[str, ...],
    names: dict[str, tuple[str, ...]] | None = None,
    arguments: tuple[str, ...] = (),
    repeat: tuple[str, ...] = (),
    settings: dict[str, tuple[str, Any]] | None = None,
    param: str = "config",
) -> Callable[[Callable], Callable]:
    """Decorate a command function taking `config: cls` and the `extras` so that typer sees the config's fields as its
    options (`option_parameters`) in the place of `config`, and the body gets the config built from them.

    Args:
        cls (`type`): the config dataclass.
        extras (`tuple[str, ...]`): the function's own parameters besides `config`, all of them (the model, the
            output, runtime options); a parameter not listed is an error, so every option is a field, a setting
            or a declared extra.
        names, arguments, repeat: as `option_parameters` takes them.
        settings (`dict[str, tuple[str, Any]]`, *optional*): options that fill keys of the mapping field
            `"mixer_settings"`, option name -> (help, type), e.g. `{"window": ("Recent tokens.", int)}`. A key
            given both here and in the field's own `KEY=VALUE` option must agree.
        param (`str`, *optional*, defaults to `"config"`): the name of the config parameter.

    Example:
        ```python
        >>> @app.command()
        ... @config_command(PruneConfig, extras=("model", "output"))
        ... def prune(model: ModelArg, output: Output, config: PruneConfig): ...
        ```
    """
    import typer

    settings = settings or {}

    def decorate(func: Callable) -> Callable:
        own = inspect.signature(func).parameters
        if param not in own or set(own) - {param} != set(extras):
            raise TypeError(f"{func.__name__} takes {sorted(set(own) - {param})}, declared extras {sorted(extras)}")
        fields = option_parameters(cls, names=names, arguments=arguments, repeat=repeat)
        options = [
            inspect.Parameter(
                key,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=typing.Annotated[kind | None, typer.Option(help=text)],
            )
            for key, (text, kind) in settings.items()
        ]
        parameters = []
        for name, parameter in own.items():
            if name == param:
                parameters += fields + options
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        option_of = {p.name: _option_name(p) for p in fields}

        @functools.wraps(func)
        def command(**values):
            given = {name: values.pop(name) for name in config_fields(cls)}
            flags = {key: value for key in settings if (value := values.pop(key)) is not None}
            config_values = {}
            for name, value in given.items():
                if (parsed := parse_option(config_fields(cls)[name], value, option_of[name])) is not None:
                    config_values[name] = parsed
            if settings:
                config_values["mixer_settings"] = _merged(config_values.get("mixer_settings", {}), flags)
            return func(**values, **{param: cls(**config_values)})

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.config_class, command.extras, command.settings = cls, tuple(extras), tuple(settings)
        return command

    return decorate


def _merged(options: dict, flags: dict) -> dict:
    for key in options.keys() & flags.keys():
        if options[key] != flags[key]:
            raise ConfigError(
                f"mixer setting {key}: {options[key]!r} (--mixer-option) and {flags[key]!r} "
                f"(--{_kebab(key)}) disagree; give it once"
            )
    return {**options, **flags}


def _option_type(field: ConfigField, *, repeat: bool) -> tuple[Any, Any, str, str | None]:
    """(type typer parses, default it shows, what the help adds, metavar) of a field's option."""
    default = None if field.required else field.default
    if field.kind == "mapping":
        return list[str] | None, None, "KEY=VALUE, repeatable.", "<key=value>"
    if field.kind == "list":
        item = getattr(_list_arm(field.annotation), "__name__", "str")
        if repeat:
            return list[str] | None, None, "Repeat the option for several.", f"<{item}>"
        return str | None, ",".join(map(str, default)) if default else None, "Comma-separated.", f"<{item},...>"
    if field.kind == "text":
        return str, str(default), "", None
    arms = _arms(field.annotation)
    base = next(arm for arm in arms if arm is not type(None))
    if typing.get_origin(base) is Literal:
        base = type(typing.get_args(base)[0])
    return (base | None if type(None) in arms else base), default, "", None


def _arms(annotation: Any) -> list:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _list_arm(annotation: Any) -> Any:
    """`int` for `tuple[int, ...]` (or `... | None`), `float` for `tuple[float, float]`."""
    for arm in _arms(annotation):
        if typing.get_origin(arm) is tuple:
            args = [a for a in typing.get_args(arm) if a is not Ellipsis]
            return args[0] if args else str
    return str


def _option_name(parameter: inspect.Parameter) -> str:
    info = typing.get_args(parameter.annotation)[1]
    decls = [d.split("/")[0] for d in (info.param_decls or ()) if d.startswith("--")]
    if info.default not in (..., None) and isinstance(info.default, str) and info.default.startswith("--"):
        decls.insert(0, info.default.split("/")[0])
    return decls[0] if decls else f"--{_kebab(parameter.name)}"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


__all__ = [
    "ConfigField",
    "coerce",
    "comma_list",
    "config_command",
    "config_fields",
    "field_help",
    "key_values",
    "option_parameters",
    "parse_option",
]
