"""Just enough DTDL v2 to check twin payloads against an interface (schemas, objects, arrays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRIMITIVES = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "double": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def load_interface(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def properties(interface: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in interface["contents"] if c["@type"] == "Property"}


def problems(value: Any, schema: Any, where: str = "$") -> list[str]:
    """Every place where ``value`` does not fit ``schema``."""
    if isinstance(schema, str):
        check = PRIMITIVES.get(schema)
        if check is None:
            return [f"{where}: unsupported schema {schema}"]
        return [] if check(value) else [f"{where}: {value!r} is not a {schema}"]
    kind = schema.get("@type")
    if kind == "Object":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        fields = {f["name"]: f["schema"] for f in schema["fields"]}
        found = [f"{where}.{k}: not in the interface" for k in value if k not in fields]
        for key, item in value.items():
            if key in fields:
                found += problems(item, fields[key], f"{where}.{key}")
        return found
    if kind == "Array":
        if not isinstance(value, list):
            return [f"{where}: not an array"]
        return [
            p
            for i, item in enumerate(value)
            for p in problems(item, schema["elementSchema"], f"{where}[{i}]")
        ]
    return [f"{where}: unsupported schema type {kind}"]
