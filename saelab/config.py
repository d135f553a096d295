"""Typed configuration: dataclasses that round-trip through the `cfg.json` files saelab writes.

Every config is a plain dataclass. `config_to_dict` / `config_from_dict` convert them, and reading rejects
unknown keys with a "did you mean" hint, because a typo in a config must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
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


def config_from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build `cls` from `data`, recursing into nested config dataclasses.

    Raises SaelabError on an unknown field (with the closest valid name) or a missing required field.
    """
    if not isinstance(data, dict):
        raise SaelabError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
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
    """Recurse into nested dataclasses; JSON lists become tuples where the field is a tuple."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value, where)
        return value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


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
