"""Typed, checked reads of what a message carries: the other side may be hostile, so every value is checked.

A value of the wrong type, out of range, or too long is a :class:`BadMessage` that names the record and key,
never the value (it may be large, or someone's data). Stdlib and Flower only: the node's queries use it.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

DIGEST = re.compile(r"[0-9a-f]{16}")  # fl_offsite.app.delivery.ModelPackage's digests
MAX_TEXT = 1 << 20  # characters of one text value (a split plan's JSON is a few hundred)


class BadMessage(ValueError):
    """A message that does not carry what its type promises."""


class SharedError(RuntimeError):
    """A node's failure whose text is written to reach the model owner: counts and names, never data."""


def config_record(msg: Message, name: str) -> ConfigRecord:
    if name not in msg.content.config_records:
        raise BadMessage(f"the {msg.metadata.message_type} message has no config record {name!r}")
    return msg.content.config_records[name]


def array_record(msg: Message, name: str) -> ArrayRecord:
    if name not in msg.content.array_records:
        raise BadMessage(f"the {msg.metadata.message_type} message has no array record {name!r}")
    return msg.content.array_records[name]


def text(record: ConfigRecord, key: str, *, pattern: re.Pattern[str] | None = None, default: str | None = None) -> str:
    """The string ``record[key]``; ``pattern`` must match all of it."""
    value = _get(record, key, default)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise BadMessage(f"{key} must be a string of at most {MAX_TEXT} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise BadMessage(f"{key} is not of the form {pattern.pattern}")
    return value


def integer(record: ConfigRecord | MetricRecord, key: str, *, low: int, high: int, default: int | None = None) -> int:
    """The integer ``record[key]``, in ``[low, high]``."""
    value = _get(record, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadMessage(f"{key} must be an integer in [{low}, {high}]")
    return value


def number(record: ConfigRecord | MetricRecord, key: str, *, low: float, high: float,
           default: float | None = None) -> float:
    """The finite number ``record[key]``, in ``[low, high]``."""
    value = _get(record, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise BadMessage(f"{key} must be a finite number in [{low:g}, {high:g}]")
    return float(value)


def flag(record: ConfigRecord, key: str) -> bool:
    """The boolean ``record[key]``."""
    value = _get(record, key, None)
    if not isinstance(value, bool):
        raise BadMessage(f"{key} must be true or false")
    return value


def json_value(record: ConfigRecord, key: str, default: str | None = None) -> Any:
    """``record[key]`` parsed as JSON (None for an empty string)."""
    raw = text(record, key, default=default)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise BadMessage(f"{key} is not valid JSON") from None


def _get(record: ConfigRecord | MetricRecord, key: str, default: Any) -> Any:
    if key in record:
        return record[key]
    if default is None:
        raise BadMessage(f"the message has no {key!r}")
    return default
