"""Validation of inventory records and paging parameters; pure, no I/O.

A record is a JSON object with a non-empty string ``name`` of at most
``MAX_NAME_LENGTH`` characters and, when present, a ``count`` that is a non-negative
integer (``true`` is not an integer here). Every other field is kept as given.
Anything ambiguous is rejected rather than guessed at: duplicate keys, ``NaN`` and
``Infinity``, bodies that are not UTF-8.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from .errors import BadRequest

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_NAME_LENGTH",
    "MAX_OFFSET",
    "Record",
    "check_name",
    "encode_record",
    "named_record",
    "parse_paging",
    "parse_record",
]

MAX_NAME_LENGTH: Final = 256
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
MAX_OFFSET: Final = 2**63 - 1  # SQLite's largest integer

Record = dict[str, Any]

# At most 19 significant digits, so int() stays cheap and the value fits SQLite.
_UNSIGNED: Final = re.compile(r"0*[0-9]{1,19}")


def parse_record(body: bytes) -> Record:
    """Decode a request body into a record, validating ``name`` and ``count`` if present."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, huge integers
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, not {_kind(value)}")
    if "name" in value:
        check_name(value["name"])
    if "count" in value:
        _check_count(value["count"])
    return value


def check_name(value: object) -> str:
    """Return ``value`` if it is a valid item name, else raise ``BadRequest``."""
    if not isinstance(value, str):
        raise BadRequest(f"name must be a string, not {_kind(value)}")
    if not value:
        raise BadRequest("name must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise BadRequest(f"name must be at most {MAX_NAME_LENGTH} characters long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" in the JSON
        raise BadRequest("name must be valid Unicode text") from None
    return value


def named_record(record: Record, query_name: str | None, *, body_name_required: bool) -> Record:
    """Reconcile the body's ``name`` with the query's ``name``; return a record that has one.

    Both given and different is an error. POST takes the name from the body only
    (``body_name_required``); PUT may take it from the query and then stores it in the record.
    """
    body_name = record.get("name")  # parse_record has checked it when present
    if body_name is None:
        if body_name_required:
            raise BadRequest("missing name: the body must have a string field 'name'")
        if query_name is None:
            raise BadRequest("missing name: give ?name= in the query or 'name' in the body")
        return {"name": query_name, **record}
    if query_name is not None and query_name != body_name:
        raise BadRequest(
            f"name in the query ({query_name!r}) differs from name in the body ({body_name!r})"
        )
    return record


def encode_record(record: Record) -> str:
    """Serialize a record as the compact JSON text that is stored."""
    try:
        return json.dumps(record, separators=(",", ":"))
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None


def parse_paging(limit: str | None, offset: str | None) -> tuple[int, int]:
    """Return ``(limit, offset)`` from the raw query values, applying the defaults."""
    return (
        _parse_unsigned("limit", limit, DEFAULT_LIMIT, MAX_LIMIT),
        _parse_unsigned("offset", offset, 0, MAX_OFFSET),
    )


def _parse_unsigned(key: str, raw: str | None, default: int, maximum: int) -> int:
    if raw is None:
        return default
    # Only ASCII digits: int() would also take " 5", "+5", "5_0" and other scripts' digits.
    if _UNSIGNED.fullmatch(raw) is None or int(raw) > maximum:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise BadRequest(f"{key} must be an integer from 0 to {maximum}, not {shown!r}")
    return int(raw)


def _check_count(value: object) -> None:
    # bool is a subclass of int in Python, but true is not a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        scalar = value is None or isinstance(value, (bool, int, float, str))
        shown = json.dumps(value) if scalar else _kind(value)
        if len(shown) > 40:
            shown = shown[:40] + "..."
        raise BadRequest(f"count must be a non-negative integer, not {shown}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _kind(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
