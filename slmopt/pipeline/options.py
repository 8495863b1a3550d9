"""Pipeline option values: the string codec of pass ``Config`` fields.

An option string is converted to the field's declared type by a rule table on the type's origin
(``Literal``, ``tuple``/``list``, ``Union``, ``bool``, ``int``/``float``, ``str``) and printed back in the
canonical spelling (lists comma separated, ``true``, ``none``), so ``str(parse_pipeline(s))`` parses back.

Example:
    >>> format_value((1, 3))
    '1,3'
    >>> describe_type(tuple[int, ...])
    'list of int'
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from slmopt.pipeline.pass_base import Pass

__all__ = ["build_config", "describe_type", "format_options", "format_value"]


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _convert(raw: str, tp: Any, where: str) -> Any:
    """Converts one option string to the field's declared type (rule table by type origin)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(raw, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[-1] if errors else f"{where}: bad value {raw!r}")
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ValueError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        inner = args[0] if args else str
        text = raw.strip("[]()")
        items = [] if not text else [s.strip() for s in text.split(",") if s.strip()]
        return tuple(_convert(s, inner, where) for s in items)
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: {raw!r} is not a boolean (true/false)")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"{where}: {raw!r} is not a valid {tp.__name__}") from None
    if tp is str:
        return raw
    raise ValueError(f"{where}: unsupported option type {tp!r}")


def format_value(value: Any) -> str:
    """An option value as a pipeline string spells it (lists comma separated, ``true``, ``none``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return str(value)


def format_options(config: Any) -> str:
    """``{k=v,...}`` for a config dataclass; empty string when it has no options."""
    items = [f"{f.name}={format_value(getattr(config, f.name))}" for f in dataclasses.fields(config)]
    return "{" + ",".join(items) + "}" if items else ""


def build_config(pass_cls: type[Pass], raw: dict[str, str]) -> Any:
    """Instantiates ``pass_cls.Config`` from raw strings, with errors naming the valid choices."""
    cfg_cls = pass_cls.Config
    hints = typing.get_type_hints(cfg_cls)
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in valid:
            choices = ", ".join(sorted(valid)) or "(none)"
            raise ValueError(f"pass {pass_cls.name!r} has no option {key!r}; valid options: {choices}")
        values[key] = _convert(text, hints[key], f"{pass_cls.name}.{key}")
    try:
        return cfg_cls(**values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"pass {pass_cls.name!r}: {err}") from None
