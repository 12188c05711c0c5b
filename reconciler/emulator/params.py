"""Validation and normalisation of request parameters, as pure functions.

Each parser takes the decoded JSON object (or the query mapping) and returns a
frozen value or raises :class:`~reconciler.emulator.errors.ApiFault` whose
message names the field, the way the real server answers
``InvalidParameter``. Like the Go server, an absent, null or empty-string field
is "not set". Out-of-range ``Duration`` and ``MaxIdleTime`` are not errors:
the server silently replaces them with their defaults (20 and 180), and so do
:func:`normalise_duration` and :func:`normalise_max_idle_time`. Unknown fields
are ignored, as the server ignores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from reconciler.core.task import DURATION_MAX, DURATION_MIN, TaskKey
from reconciler.emulator.errors import ApiFault, invalid

__all__ = [
    "DURATION_DEFAULT",
    "MAX_IDLE_DEFAULT",
    "MAX_IDLE_MAX",
    "MAX_IDLE_MIN",
    "MAX_TARGET_STREAMS",
    "JsonObject",
    "StartParams",
    "UpdateParams",
    "normalise_duration",
    "normalise_max_idle_time",
    "parse_body",
    "parse_key",
    "parse_start",
    "parse_update",
]

JsonObject = dict[str, Any]

DURATION_DEFAULT: Final = 20
MAX_IDLE_MIN: Final = 1
MAX_IDLE_MAX: Final = 86400
MAX_IDLE_DEFAULT: Final = 180
MAX_TARGET_STREAMS: Final = 17

_ID_RE: Final = re.compile(r"[a-zA-Z0-9_@\-.]{1,128}")
_UINT32_MAX: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class StartParams:
    """A validated, normalised StartSegment request (also the admin's seed form)."""

    key: TaskKey
    business_id: str | None
    identifier: str | None
    handle: bool
    duration: int
    max_idle_time: int
    target_streams: JsonObject
    control: JsonObject


@dataclass(frozen=True, slots=True)
class UpdateParams:
    """A validated UpdateSegment request: only the fields it carries are set."""

    key: TaskKey
    identifier: str | None
    handle: bool | None
    duration: int | None


def parse_body(raw: bytes) -> JsonObject:
    """The JSON object of a POST body, or the server's body errors."""
    if not raw.strip():
        raise ApiFault("InvalidParameter.BodyIsEmpty", "Request content is empty.", status=400)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiFault(
            "InvalidParameter.Unmarshal", "Request parsing failed: body is not JSON.", status=400
        ) from None
    if not isinstance(doc, dict):
        raise ApiFault(
            "InvalidParameter.Unmarshal",
            "Request parsing failed: body is not a JSON object.",
            status=400,
        )
    return doc


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _id(params: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = params.get(name)
    # Like the Go server, an absent, null or empty string field is "not set".
    if value is None or value == "":
        if required:
            raise invalid(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {_short(value)}")
    if not _ID_RE.fullmatch(value):
        raise invalid(f"{name} {_short(value)} does not match [a-zA-Z0-9_@\\-\\.]{{1,128}}")
    return value


def parse_key(params: Mapping[str, Any]) -> TaskKey:
    """The task identity; every part is required and id-shaped."""
    app, room, task = (_id(params, n, required=True) for n in ("AppId", "RoomId", "TaskId"))
    assert app is not None and room is not None and task is not None
    return TaskKey(app, room, task)


def _uint32(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise invalid(f"{name} must be an unsigned 32-bit integer, got {_short(value)}")
    return value


def _bool(params: Mapping[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a bool, got {_short(value)}")
    return value


def _object(params: Mapping[str, Any], name: str) -> JsonObject | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object, got {_short(value)}")
    return dict(value)


def normalise_duration(value: int | None) -> int:
    """Out of [1, 600] (or absent) silently becomes 20, as the server does."""
    if value is None or not DURATION_MIN <= value <= DURATION_MAX:
        return DURATION_DEFAULT
    return value


def normalise_max_idle_time(value: int | None) -> int:
    """Out of [1, 86400] (or absent) silently becomes 180, as the server does."""
    if value is None or not MAX_IDLE_MIN <= value <= MAX_IDLE_MAX:
        return MAX_IDLE_DEFAULT
    return value


def parse_start(params: Mapping[str, Any]) -> StartParams:
    """Validate and normalise a StartSegment body; unknown fields are ignored."""
    key = parse_key(params)
    streams = _object(params, "TargetStreams") or {}
    stream_list = streams.get("StreamList", [])
    if not isinstance(stream_list, list) or not all(isinstance(s, dict) for s in stream_list):
        raise invalid("TargetStreams.StreamList must be a list of objects")
    if len(stream_list) > MAX_TARGET_STREAMS:
        raise invalid(f"TargetStreams.StreamList holds at most {MAX_TARGET_STREAMS} streams")
    handle = _bool(params, "Handle")
    return StartParams(
        key=key,
        business_id=_id(params, "BusinessId", required=False),
        identifier=_id(params, "Identifier", required=False),
        handle=True if handle is None else handle,
        duration=normalise_duration(_uint32(params, "Duration")),
        max_idle_time=normalise_max_idle_time(_uint32(params, "MaxIdleTime")),
        target_streams={**streams, "StreamList": list(stream_list)},
        control=_object(params, "Control") or {},
    )


def parse_update(params: Mapping[str, Any]) -> UpdateParams:
    """Validate an UpdateSegment body.

    Only Identifier, Handle and Duration are read; StartSegment-only fields
    such as MaxIdleTime and TargetStreams are ignored like the real server
    ignores them. BusinessId is checked for shape but cannot change anything.
    """
    key = parse_key(params)
    _id(params, "BusinessId", required=False)
    duration = _uint32(params, "Duration")
    return UpdateParams(
        key=key,
        identifier=_id(params, "Identifier", required=False),
        handle=_bool(params, "Handle"),
        duration=None if duration is None else normalise_duration(duration),
    )
