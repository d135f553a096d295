"""Typed configuration: dataclasses that round-trip through the `cfg.json` files saelab writes.

Every config is a plain dataclass. `config_to_dict` / `config_from_dict` convert them, and reading rejects
unknown keys with a "did you mean" hint, because a typo in a config must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from saelab.errors import SaelabError

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid fields: {', '.join(sorted(options))}"


def config_from_dict(cls: type[C], data: dict[str, Any], where: str = "config", extra_keys: bool = False) -> C:
    """Build `cls` from `data`, checking every value against the field's type hint (see `_coerce`).

    This is the one validation path for everything saelab reads back (cfg.json files, cache manifests, source
    specs). Raises SaelabError on a wrong-typed value, an unknown field (with the closest valid name; ignored with
    `extra_keys`, for formats other tools extend) or a missing required field.
    """
    if not isinstance(data, dict):
        raise SaelabError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields and not extra_keys:
            raise SaelabError(f"{where}: unknown field '{key}' for {cls.__name__}{_closest(key, fields)}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            if not has_default:
                raise SaelabError(f"{where}: missing required field '{name}' for {cls.__name__}")
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the type hint `hint` (recursing into dataclasses, unions, tuples, lists, dicts and
    Literals); JSON lists become tuples where the field is a tuple. A mismatch is a one-line SaelabError.

    Strict where JSON makes mistakes easy: a bool is not a number, "false" is not a bool, "2" is not an int, and a
    float must be finite; an integral float (2.0) is accepted as an int.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            _mismatch(f"a JSON object ({hint.__name__})", value, where)
        return config_from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        structured = [a for a in arms if dataclasses.is_dataclass(a) or typing.get_origin(a) in (list, tuple, dict)]
        if len(arms) == 1 and structured:  # Optional[a config or container]: its own error says what is wrong inside
            return _coerce(arms[0], value, where)
        for arm in arms:
            try:
                return _coerce(arm, value, where)
            except SaelabError:
                continue
        _mismatch(" or ".join(_describe(a) for a in args), value, where)
    if origin is typing.Literal:
        if value not in args:
            _mismatch("one of " + ", ".join(repr(a) for a in args), value, where)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            _mismatch("true or false", value, where)
        return value
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            _mismatch("an integer", value, where)
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            _mismatch("a finite number", value, where)
        return value
    if hint is str:
        if not isinstance(value, str):
            _mismatch("a string", value, where)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _mismatch(f"a list ({_describe(hint)})", value, where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                _mismatch(f"a list of {len(args)} values", value, where)
            items = [_coerce(arm, item, f"{where}[{i}]") for i, (arm, item) in enumerate(zip(args, value, strict=True))]
        else:
            arm = args[0] if args else Any
            items = [_coerce(arm, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            _mismatch("a JSON object", value, where)
        key_hint, value_hint = args if args else (Any, Any)
        return {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    return value


def _describe(hint: Any) -> str:
    names = {type(None): "null", int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    return names.get(hint) or getattr(hint, "__name__", str(hint))


def _mismatch(expected: str, value: Any, where: str) -> typing.NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise SaelabError(f"{where} must be {expected}, got {shown}")


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning missing files and syntax errors into one-line errors."""
    if not path.is_file():
        raise SaelabError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SaelabError(f"{path} is not valid JSON ({err}); the file is corrupt or not a saelab file") from None
    if not isinstance(data, dict):
        raise SaelabError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def require_positive_ints(config: object, names: typing.Iterable[str], prefix: str = "") -> None:
    """Raise SaelabError unless every named field of `config` is a positive int (a bool is not a count)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SaelabError(f"{prefix}{name} must be a positive integer, got {value!r}")
