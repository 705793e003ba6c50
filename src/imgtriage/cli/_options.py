"""Command-line options generated from a frozen config dataclass, and the config back.

Each field of the config carries its ``--help`` text in ``metadata["help"]`` (and, where the
flag is not ``--field-name``, its flag in ``metadata["flag"]``), so a command built here has one
option per field, with the library's defaults, and the two cannot drift apart.
``imgtriage train`` (``cli/train_cmd.py``) works the same way over ``TrainConfig``.

Field types map to options: ``bool`` -> ``--x/--no-x`` (a plain ``--x`` switch where
``metadata["switch"]`` is true; a flag such as ``--on/--off`` as written); ``tuple[str, ...]`` ->
comma-separated text, or a repeatable option where ``metadata["repeat"]`` is true;
``tuple[int, ...]`` -> comma-separated integers; ``X | None`` -> an option that may be left
out (None). ``metadata["short"]`` adds a short flag to a non-bool option (e.g. ``-o``).

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
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable
from dataclasses import MISSING, fields
from typing import Any

import typer


def _flag(f: Any) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), True
    return hint, False


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return ...


def config_parameters(cls: type, *, skip: Iterable[str] = (),
                      panels: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword option per field of ``cls`` that has help text (fields in ``skip`` and
    fields without ``metadata["help"]`` are left to the command). ``panels``: first field of
    a section -> its --help panel."""
    hints = typing.get_type_hints(cls)
    out, panel = [], None
    for f in fields(cls):
        panel = (panels or {}).get(f.name, panel)
        if f.name in set(skip) or "help" not in f.metadata:
            continue
        hint, _ = _base(hints[f.name])
        default = _default(f)
        if hint is bool:
            flag = _flag(f)
            switch = f.metadata.get("switch") or "/" in flag
            names = [flag if switch else f"{flag}/--no-{flag[2:]}"]
            annotation: Any = bool
        elif _is_tuple(hint) and f.metadata.get("repeat"):
            names, annotation = [_flag(f)], list[str] | None
            default = None
        elif _is_tuple(hint):
            names, annotation = [_flag(f)], str | None
            default = ",".join(str(v) for v in default) if default else None
        else:
            names, annotation = [_flag(f)], hint | None if default is None else hint
        if f.metadata.get("short"):
            names.append(f.metadata["short"])
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                     annotation=annotation,
                                     default=typer.Option(default, *names,
                                                          help=f.metadata["help"],
                                                          rich_help_panel=panel)))
    return out


def config_from_options(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """The config from option values (text and lists back to tuples); ``fixed`` sets the
    fields the command takes as arguments."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(fixed)
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        hint, _ = _base(hints[f.name])
        if _is_tuple(hint) and value is not None:
            items = value if isinstance(value, list) else [v.strip() for v in
                                                           str(value).split(",")]
            elem = typing.get_args(hint)[0] if typing.get_args(hint) else str
            value = tuple(elem(v) for v in items if v != "")
        elif _is_tuple(hint) and value is None:
            value = _default(f)
        kwargs[f.name] = value
    return cls(**kwargs)
