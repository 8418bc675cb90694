"""The event schemas of docs/interfaces.md: impressions, feedback, samples, dead-letters.

Invariant: every event that leaves `decode_*` is fully valid (types, ranges, required fields);
anything else raises `SchemaError` whose `.reason` names the offending field, and which the join
turns into a dead letter with the original bytes. Events are plain dicts (TypedDicts below),
encoded with orjson; `encode_*` validates too, so a producer cannot put a bad event on a topic.

Two tiers, one rule: the `validate_*` functions here are the reference (field by field, the reason
names the field); `streaming.fast_schemas` (msgspec, in C) is the one fast path, which accepts a
subset of what they accept. `decode_*` / `encode_*` try the fast path and ask the reference only
when it refuses (for the reason, or for an event with members of its own).

One deliberate extension of interfaces.md: `semantic_id` of an impression item may be null for
`source == "legacy"` traffic (replayed logs carry no tokenizer); the sample then has
`semantic_id: null` and the learner tokenizes the item itself.
"""
from __future__ import annotations

import base64
import math
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from learner.flags import ACTIONS as OPTIONAL_ACTIONS

SOURCES = ("onerec", "legacy")
MAX_FLAGS = 127
MAX_INT = 2**63 - 1   # every integer of an event is an int64 (Java's long; what Kafka's JVM clients and Parquet hold)


class SchemaError(ValueError):
    """An event that does not match its schema; `reason` names the field."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Behaviour(TypedDict):
    item_id: list[int]
    duration_s: list[float]
    play_time_s: list[float]
    flags: list[int]


class UserContext(TypedDict):
    profile: list[int]
    short: Behaviour
    long: Behaviour


class ShownItem(TypedDict):
    item_id: int
    semantic_id: list[int] | None
    duration_s: float
    logprob: float | None


class Impression(TypedDict):
    request_id: str
    user_id: int
    ts: float
    model_version: int
    source: Literal["onerec", "legacy"]
    context: UserContext
    items: list[ShownItem]
    arm: NotRequired[str | None]   # the A/B arm that served it; samples carry it (null when absent)


class Feedback(TypedDict, total=False):
    request_id: str
    user_id: int
    item_id: int
    ts: float
    play_time_s: float
    dislike: bool
    like: bool
    follow: bool
    comment: bool
    forward: bool
    collect: bool


class Sample(TypedDict):
    request_id: str
    user_id: int
    item_id: int
    ts: float
    model_version: int
    source: str
    context: UserContext
    semantic_id: list[int] | None
    duration_s: float
    logprob: float | None
    feedback: Feedback | None
    q: float | None
    duration_bucket: int
    arm: NotRequired[str | None]   # the impression's arm (null when it had none); plus any member of its own


class DeadLetter(TypedDict):
    topic: str
    reason: str
    original: str   # base64 of the original bytes
    ts: float


# --- field checks: each returns the clean value or raises SchemaError naming the field

def _int(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(f"{name} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise SchemaError(f"{name} must be >= {minimum}, got {value}")
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise SchemaError(f"{name} must fit in 64 bits (int64), got {value}")
    return value


def _float(value: Any, name: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise SchemaError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise SchemaError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise SchemaError(f"{name} must be a non-empty string")
    return value


def require(event: dict, name: str, where: str = "") -> Any:
    if name not in event:
        raise SchemaError(f"{where}{name} is required")
    return event[name]


def json_object(raw: bytes | dict, kind: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        event = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise SchemaError(f"{kind}: not valid JSON ({exc})") from None
    if not isinstance(event, dict):
        raise SchemaError(f"{kind}: must be a JSON object, got {type(event).__name__}")
    return event


def _behaviour(value: Any, name: str) -> Behaviour:
    if not isinstance(value, dict):
        raise SchemaError(f"{name} must be an object with item_id, duration_s, play_time_s, flags")
    out = {}
    for key in ("item_id", "duration_s", "play_time_s", "flags"):
        seq = require(value, key, f"{name}.")
        if not isinstance(seq, list):
            raise SchemaError(f"{name}.{key} must be a list")
        out[key] = seq
    n = len(out["item_id"])
    for key, seq in out.items():
        if len(seq) != n:
            raise SchemaError(f"{name}.{key} has length {len(seq)}, {name}.item_id has {n}")
    for i in range(n):
        _int(out["item_id"][i], f"{name}.item_id[{i}]", minimum=0)
        _float(out["duration_s"][i], f"{name}.duration_s[{i}]", minimum=0.0)
        _float(out["play_time_s"][i], f"{name}.play_time_s[{i}]", minimum=0.0)
        flags = _int(out["flags"][i], f"{name}.flags[{i}]", minimum=0)
        if flags > MAX_FLAGS:
            raise SchemaError(f"{name}.flags[{i}] must be <= {MAX_FLAGS}, got {flags}")
    return out  # type: ignore[return-value]


def validate_context(context: Any, name: str = "context") -> UserContext:
    """The user context of interfaces.md; at least one token (the profile counts)."""
    if not isinstance(context, dict):
        raise SchemaError(f"{name} must be an object with profile, short, long")
    profile = require(context, "profile", f"{name}.")
    if not isinstance(profile, list):
        raise SchemaError(f"{name}.profile must be a list of integers")
    for i, v in enumerate(profile):
        _int(v, f"{name}.profile[{i}]", minimum=0)
    short = _behaviour(require(context, "short", f"{name}."), f"{name}.short")
    long = _behaviour(require(context, "long", f"{name}."), f"{name}.long")
    if not profile and not short["item_id"] and not long["item_id"]:
        raise SchemaError(f"{name} must have at least one token (profile, short or long)")
    return context  # type: ignore[return-value]


def _semantic_id(value: Any, name: str, *, nullable: bool) -> list[int] | None:
    if value is None:
        if nullable:
            return None
        raise SchemaError(f"{name} is required for source 'onerec'")
    if not isinstance(value, list) or len(value) != 3:
        raise SchemaError(f"{name} must be a list of 3 integers")
    for level, v in enumerate(value):
        _int(v, f"{name}[{level}]", minimum=0)
    return value


def _arm(event: dict) -> None:
    arm = event.get("arm")
    if arm is not None and not isinstance(arm, str):
        raise SchemaError(f"arm must be a string or null, got {type(arm).__name__}")


def validate_impression(event: dict, *, check_context: bool = True) -> Impression:
    """The reference check of an impression, field by field; `check_context=False`: all but the context."""
    _str(require(event, "request_id"), "request_id")
    _int(require(event, "user_id"), "user_id", minimum=0)
    _float(require(event, "ts"), "ts", minimum=0.0)
    _int(require(event, "model_version"), "model_version", minimum=0)
    source = require(event, "source")
    if source not in SOURCES:
        raise SchemaError(f"source must be one of {SOURCES}, got {source!r}")
    _arm(event)
    if check_context:
        validate_context(require(event, "context"))
    items = require(event, "items")
    if not isinstance(items, list) or not items:
        raise SchemaError("items must be a non-empty list")
    seen: set[int] = set()
    for i, item in enumerate(items):
        where = f"items[{i}]."
        if not isinstance(item, dict):
            raise SchemaError(f"items[{i}] must be an object")
        item_id = _int(require(item, "item_id", where), f"{where}item_id", minimum=0)
        if item_id in seen:
            raise SchemaError(f"{where}item_id {item_id} is shown twice in one request")
        seen.add(item_id)
        _semantic_id(item.get("semantic_id"), f"{where}semantic_id", nullable=source == "legacy")
        _float(require(item, "duration_s", where), f"{where}duration_s", minimum=0.0)
        logprob = item.get("logprob")
        if source == "onerec":
            if logprob is None:
                raise SchemaError(f"{where}logprob is required for source 'onerec'")
            if _float(logprob, f"{where}logprob") > 0:
                raise SchemaError(f"{where}logprob must be <= 0, got {logprob}")
        elif logprob is not None:
            raise SchemaError(f"{where}logprob must be null for source 'legacy'")
    return event  # type: ignore[return-value]


def validate_feedback(event: dict) -> Feedback:
    """The reference check of a feedback event, field by field."""
    _str(require(event, "request_id"), "request_id")
    _int(require(event, "user_id"), "user_id", minimum=0)
    _int(require(event, "item_id"), "item_id", minimum=0)
    _float(require(event, "ts"), "ts", minimum=0.0)
    _float(require(event, "play_time_s"), "play_time_s", minimum=0.0)
    _bool(require(event, "dislike"), "dislike")
    for name in OPTIONAL_ACTIONS:
        if name in event:
            _bool(event[name], name)
    return event  # type: ignore[return-value]


def validate_sample(event: dict) -> Sample:
    """The reference check of a sample, field by field."""
    for name in ("request_id", "source"):
        _str(require(event, name), name)
    _int(require(event, "user_id"), "user_id", minimum=0)
    _int(require(event, "item_id"), "item_id", minimum=0)
    _float(require(event, "ts"), "ts", minimum=0.0)
    _int(require(event, "model_version"), "model_version", minimum=0)
    validate_context(require(event, "context"))
    _semantic_id(require(event, "semantic_id"), "semantic_id", nullable=event["source"] == "legacy")
    _float(require(event, "duration_s"), "duration_s", minimum=0.0)
    if require(event, "logprob") is not None:
        _float(event["logprob"], "logprob")
    feedback = require(event, "feedback")
    if feedback is not None:
        if not isinstance(feedback, dict):
            raise SchemaError(f"feedback must be a feedback event (an object) or null, got {type(feedback).__name__}")
        validate_feedback(feedback)
    q = require(event, "q")
    if q is not None:
        q = _float(q, "q", minimum=0.0)
        if q > 1.0:
            raise SchemaError(f"q must be <= 1, got {q}")
    if (feedback is None) != (q is None):
        raise SchemaError("q must be set exactly when feedback is set")
    _int(require(event, "duration_bucket"), "duration_bucket")
    _arm(event)
    return event  # type: ignore[return-value]


def decode_impression(raw: bytes | dict) -> Impression:
    if isinstance(raw, dict):
        return validate_impression(raw)
    if _fast.check_impression(raw):
        return orjson.loads(raw)
    return validate_impression(json_object(raw, "impression"))


def decode_context(raw: bytes) -> UserContext:
    """A user context from its JSON bytes, validated."""
    _fast.decode_context(raw)
    return orjson.loads(raw)


def decode_feedback(raw: bytes | dict) -> Feedback:
    if isinstance(raw, dict):
        return validate_feedback(raw)
    _fast.decode_feedback(raw)
    return orjson.loads(raw)


def decode_sample(raw: bytes | dict) -> Sample:
    if isinstance(raw, dict):
        return validate_sample(raw)
    if _fast.check_sample(raw):
        return orjson.loads(raw)
    return validate_sample(json_object(raw, "sample"))


def decode_dead_letter(raw: bytes) -> DeadLetter:
    event = json_object(raw, "dead letter")
    _str(require(event, "topic"), "topic")
    _str(require(event, "reason"), "reason")
    original = require(event, "original")
    if not isinstance(original, str):
        raise SchemaError("original must be a base64 string")
    _float(require(event, "ts"), "ts", minimum=0.0)
    return event  # type: ignore[return-value]


def encode_impression(event: Impression) -> bytes:
    raw = orjson.dumps(event)
    if not _fast.check_impression(raw):
        validate_impression(event)
    return raw


def encode_feedback(event: Feedback) -> bytes:
    raw = orjson.dumps(event)
    _fast.decode_feedback(raw)
    return raw


def encode_sample(event: Sample) -> bytes:
    raw = orjson.dumps(event)
    if not _fast.check_sample(raw):
        validate_sample(event)
    return raw


def dead_letter(*, topic: str, reason: str, original: bytes, ts: float) -> DeadLetter:
    return {"topic": topic, "reason": reason, "original": base64.b64encode(original).decode("ascii"), "ts": ts}


def encode_dead_letter(event: DeadLetter) -> bytes:
    return orjson.dumps(event)


def dead_letter_original(event: DeadLetter) -> bytes:
    return base64.b64decode(event["original"])


def sample_id(sample: Sample) -> tuple[str, int]:
    """The identity of a sample: at-least-once delivery may repeat it, consumers dedupe on this."""
    return sample["request_id"], sample["item_id"]


from streaming import fast_schemas as _fast  # noqa: E402 - it builds on the names above (see its docstring)
