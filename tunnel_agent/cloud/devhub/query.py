"""The part of IoT Hub's query language the emulator answers, over twin documents.

``SELECT * FROM devices`` with an optional ``WHERE`` of comparisons joined by ``AND``:
``deviceId = 'cam1'``, ``properties.reported.firmware = '1.2'``, ``tags.site != 'lab'``,
``properties.reported.fps >= 15``. Anything else is refused with the reason, as IoT Hub does.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+(?:\.\d+)?)|(?P<op><>|!=|<=|>=|=|<|>)"
    r"|(?P<word>[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*)|(?P<star>\*))"
)


class QueryError(Exception):
    """The query is not one the emulator understands; the message says where."""


def _ordered(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def check(left: Any, right: Any) -> bool:
        if isinstance(left, bool) or isinstance(right, bool):
            return False
        if isinstance(left, int | float) and isinstance(right, int | float):
            return compare(left, right)
        if isinstance(left, str) and isinstance(right, str):
            return compare(left, right)
        return False

    return check


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": _ordered(operator.lt),
    "<=": _ordered(operator.le),
    ">": _ordered(operator.gt),
    ">=": _ordered(operator.ge),
}


@dataclass(frozen=True)
class Condition:
    path: tuple[str, ...]
    op: str
    value: Any

    def holds(self, document: dict[str, Any]) -> bool:
        found: Any = document
        for part in self.path:
            if not isinstance(found, dict) or part not in found:
                return False
            found = found[part]
        return OPERATORS[self.op](found, self.value)


@dataclass(frozen=True)
class Query:
    conditions: tuple[Condition, ...]

    def matches(self, document: dict[str, Any]) -> bool:
        return all(condition.holds(document) for condition in self.conditions)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise QueryError(f"cannot read the query at {text[position : position + 20]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def _literal(kind: str, text: str) -> Any:
    if kind == "string":
        return text[1:-1].replace("''", "'")
    if kind == "number":
        return float(text) if "." in text else int(text)
    if kind == "word" and text.lower() in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[text.lower()]
    raise QueryError(f"expected a value, found {text!r}")


def parse_query(text: str) -> Query:
    tokens = _tokens(text)
    words = [value.lower() for _, value in tokens[:4]]
    if words[:4] != ["select", "*", "from", "devices"]:
        raise QueryError("only SELECT * FROM devices [WHERE ...] is supported")
    rest = tokens[4:]
    if not rest:
        return Query(())
    if rest[0][1].lower() != "where":
        raise QueryError(f"expected WHERE, found {rest[0][1]!r}")
    conditions: list[Condition] = []
    index = 1
    while True:
        if index + 3 > len(rest):
            raise QueryError("WHERE needs <property> <operator> <value>")
        (path_kind, path), (op_kind, op), (value_kind, value) = rest[index : index + 3]
        if path_kind != "word" or op_kind != "op":
            raise QueryError(f"expected <property> <operator> <value> at {path!r}")
        conditions.append(Condition(tuple(path.split(".")), op, _literal(value_kind, value)))
        index += 3
        if index == len(rest):
            return Query(tuple(conditions))
        if rest[index][1].lower() != "and":
            raise QueryError(f"only AND joins conditions, found {rest[index][1]!r}")
        index += 1
