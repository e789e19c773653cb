"""Just enough TOML writing for test configurations (tables, arrays of tables, scalars, lists)."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))


def dumps(document: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in document.items():
        if not isinstance(value, dict | list) or (
            isinstance(value, list) and not _is_tables(value)
        ):
            lines.append(f"{key} = {_value(value)}")
    for key, value in document.items():
        if isinstance(value, dict):
            lines.extend(_table(key, value, array=False))
        elif isinstance(value, list) and _is_tables(value):
            for item in value:
                lines.extend(_table(key, item, array=True))
    return "\n".join(lines) + "\n"


def _is_tables(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, dict) for v in value)


def _table(name: str, table: dict[str, Any], *, array: bool) -> list[str]:
    lines = ["", f"[[{name}]]" if array else f"[{name}]"]
    nested = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict):
            nested.append((key, value, False))
        elif isinstance(value, list) and _is_tables(value):
            nested.append((key, value, True))
        else:
            lines.append(f"{key} = {_value(value)}")
    for key, value, is_array in nested:
        if is_array:
            for item in value:
                lines.extend(_table(f"{name}.{key}", item, array=True))
        else:
            lines.extend(_table(f"{name}.{key}", value, array=False))
    return lines
