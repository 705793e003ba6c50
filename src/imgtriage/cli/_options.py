"""Command-line options generated from frozen config dataclasses, and the configs back: the
one generator every ``imgtriage`` command uses.

Each field of a config carries its ``--help`` text in ``metadata["help"]`` (and, where the
flag is not ``--field-name``, its flag in ``metadata["flag"]``), so a command built here has one
option per field, with the library's defaults, and the two cannot drift apart. A command is
declared with :func:`command`: its positional arguments, then the configs whose fields are its
options; ``tests/cli/test_generated_options.py`` walks every registered command and fails on
an option no config field backs.

Field types map to options: ``bool`` -> ``--x/--no-x`` (a plain ``--x`` switch where
``metadata["switch"]`` is true; a flag such as ``--on/--off`` as written); ``tuple[T, ...]`` ->
comma-separated text (each item a ``T``), or a repeatable option where ``metadata["repeat"]``
is true; ``dict`` -> JSON text; ``X | None`` -> an option that may be left out (None); a field
without a default -> a required option. ``metadata["short"]`` adds a short flag (e.g. ``-o``)
to any option but an on/off pair; ``metadata["parse"]`` (a function of the text) reads a text
option the config's own way. A flag written without dashes (``"threads"``) means ``--threads``.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     size: int = field(default=3, metadata={"help": "Size."})
    ...     names: tuple[str, ...] = field(default=("a",), metadata={"help": "Names."})
    >>> [p.name for p in config_parameters(Demo)]
    ['size', 'names']
    >>> config_from_options(Demo, {"size": 4, "names": "x, y"})
    Demo(size=4, names=('x', 'y'))
    >>> cli_default(Demo, fields(Demo)[1])
    'a'
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, fields
from typing import Any

import typer

from imgtriage.errors import ConfigError

KW = inspect.Parameter.KEYWORD_ONLY


def option_flag(f: Field) -> str:
    """The long flag of a config field (``--field-name`` unless its metadata names one)."""
    flag = f.metadata.get("flag")
    if not flag:
        return "--" + f.name.replace("_", "-")
    return flag if flag.startswith("-") else "--" + flag.replace("_", "-")


def _base(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed); of a union of several types, the
    first (``str | bool`` is read as text)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], type(None) in args
    return hint, False


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _is_dict(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return ...


def _as_text(f: Field, hint: Any) -> bool:
    """Fields whose option is text the config reads back (tuples, dicts, parse hooks)."""
    return bool(f.metadata.get("parse")) or _is_dict(hint) or (
        _is_tuple(hint) and not f.metadata.get("repeat"))


def cli_default(cls: type, f: Field) -> Any:
    """The default the option of field ``f`` of ``cls`` shows in ``--help``: the field's, as
    the option's text (``...`` for a required option; None where the text is empty)."""
    hint, _ = _base(typing.get_type_hints(cls)[f.name])
    default = _default(f)
    if default is ... or not (_is_tuple(hint) or _is_dict(hint)):
        return default
    if f.metadata.get("repeat") or not default:
        return None
    if _is_dict(hint):
        return json.dumps(default)
    return ",".join(str(v) for v in default)


def _annotation(f: Field, hint: Any, default: Any) -> tuple[list[str], Any]:
    flag = option_flag(f)
    if hint is bool:
        switch = f.metadata.get("switch") or "/" in flag
        return [flag if switch else f"{flag}/--no-{flag[2:]}"], bool
    if _is_tuple(hint) and f.metadata.get("repeat"):
        return [flag], list[str] | None
    if _as_text(f, hint):
        return [flag], str | None
    return [flag], (hint | None if default is None else hint)


def config_parameters(cls: type, *, skip: Iterable[str] = (),
                      panels: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword option per field of ``cls`` that has help text (fields in ``skip`` and
    fields without ``metadata["help"]`` are left to the command). ``panels``: first field of
    a section -> its --help panel."""
    hints = typing.get_type_hints(cls)
    out, panel, skipped = [], None, set(skip)
    for f in fields(cls):
        panel = (panels or {}).get(f.name, panel)
        if f.name in skipped or "help" not in f.metadata:
            continue
        hint, _ = _base(hints[f.name])
        names, annotation = _annotation(f, hint, _default(f))
        if f.metadata.get("short") and "/" not in names[0]:
            names.append(f.metadata["short"])
        out.append(inspect.Parameter(f.name, KW, annotation=annotation,
                                     default=typer.Option(cli_default(cls, f), *names,
                                                          help=f.metadata["help"],
                                                          rich_help_panel=panel)))
    return out


def _from_text(f: Field, hint: Any, value: Any) -> Any:
    """An option's text or list back to the field's value; bad text names the flag."""
    if value is None:
        return _default(f)
    parse: Callable[[str], Any] | None = f.metadata.get("parse")
    if parse is not None:
        return parse(value)
    if _is_dict(hint):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{option_flag(f)} takes JSON, e.g. '{{\"a\": 1}}'; this is "
                              f"not valid JSON ({exc.msg})") from exc
    items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    elem = typing.get_args(hint)[0] if typing.get_args(hint) else str
    try:
        return tuple(elem(v) for v in items if v != "")
    except ValueError as exc:
        raise ConfigError(f"{option_flag(f)} takes comma-separated "
                          f"{'numbers' if elem in (int, float) else 'values'}, got "
                          f"{value!r}") from exc


def option_value(cls: type, f: Field, value: Any) -> Any:
    """What field ``f`` of ``cls`` gets from its option's ``value`` (text, a list or the
    option's own type)."""
    hint, _ = _base(typing.get_type_hints(cls)[f.name])
    if _as_text(f, hint) or (_is_tuple(hint) and f.metadata.get("repeat")):
        return _from_text(f, hint, value)
    return value


def context_parameter() -> inspect.Parameter:
    """The running command's context (not an option): a command that declares it among its
    arguments lets :func:`config_from_options` tell a config with a ``given`` field which
    options were typed rather than left at their defaults."""
    return inspect.Parameter("ctx", KW, annotation=typer.Context)


def typed_options(ctx: Any, names: Iterable[str]) -> tuple[str, ...]:
    """Which of ``names`` were given on the command line (or the environment) rather than
    left at their defaults."""
    return tuple(n for n in names if (source := ctx.get_parameter_source(n)) is not None
                 and source.name != "DEFAULT")


def config_from_options(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """The config from option values (text and lists back to tuples, JSON to dicts);
    ``fixed`` sets the fields the command takes as arguments. A config with a ``given``
    field (``TrainConfig``) learns which options were typed when the command declares
    :func:`context_parameter`: ``--model auto`` keeps those, even where they equal the
    default."""
    kwargs = dict(fixed)
    names = [f.name for f in fields(cls)]
    for f in fields(cls):
        if f.name in values:
            kwargs[f.name] = option_value(cls, f, values[f.name])
    ctx = values.get("ctx")
    # typer hands the command its click context (typer.Context's base class)
    if "given" in names and callable(getattr(ctx, "get_parameter_source", None)):
        kwargs["given"] = (*fixed, *typed_options(ctx, (n for n in names if n in values)))
    return cls(**kwargs)


def argument(name: str, help: str, annotation: Any = Any, default: Any = ...,
             ) -> inspect.Parameter:
    """A positional argument of a command (what it works on: a bundle, a data folder)."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation=annotation,
                             default=typer.Argument(default, help=help))


def command(func: Callable[..., Any], *, arguments: Sequence[inspect.Parameter] = (),
            configs: Sequence[type] = (), skip: Iterable[str] = (),
            panels: dict[str, str] | None = None) -> Callable[..., Any]:
    """Give ``func`` its command-line signature: ``arguments``, then one option per field of
    each config in ``configs`` (in order; ``skip``: fields given as arguments instead). The
    configs are kept on ``func.configs`` (the option test reads them); ``func`` receives every
    value by keyword and rebuilds each config with :func:`config_from_options`."""
    params = list(arguments)
    for cls in configs:
        params += config_parameters(cls, skip=skip, panels=panels)
    func.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    func.configs = tuple(configs)  # type: ignore[attr-defined]
    return func
