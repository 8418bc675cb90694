"""The event schemas of docs/interfaces.md: impressions, feedback, samples, dead-letters.

Invariant: every event that leaves `decode_*` is fully valid (types, ranges, required fields);
anything else raises `SchemaError` whose `.reason` names the offending field, and which the Faust
agents turn into a dead letter with the original bytes. Events are plain dicts (TypedDicts below),
encoded with orjson; `encode_*` validates too, so a producer cannot put a bad event on a topic.

One deliberate extension of interfaces.md: `semantic_id` of an impression item may be null for
`source == "legacy"` traffic (replayed logs carry no tokenizer); the sample then has
`semantic_id: null` and the learner tokenizes the item itself.
"""
from __future__ import annotations

import base64
import math
import sys
from array import array
from typing import Any, Literal, TypedDict

import orjson

SOURCES = ("onerec", "legacy")
from learner.flags import FLAG_BITS, action_flags  # noqa: E402,F401 - the one table (re-exported)
OPTIONAL_ACTIONS = ("like", "follow", "comment", "forward", "collect")
MAX_FLAGS = 127
MAX_INT = 2**63 - 1   # every integer of an event is an int64 (Java's long; what Kafka's JVM clients and Parquet hold)
_MAX_FLOAT = sys.float_info.max


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


def _require(event: dict, name: str, where: str = "") -> Any:
    if name not in event:
        raise SchemaError(f"{where}{name} is required")
    return event[name]


def _object(raw: bytes | dict, kind: str) -> dict:
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
        seq = _require(value, key, f"{name}.")
        if not isinstance(seq, list):
            raise SchemaError(f"{name}.{key} must be a list")
        out[key] = seq
    n = len(out["item_id"])
    for key, seq in out.items():
        if len(seq) != n:
            raise SchemaError(f"{name}.{key} has length {len(seq)}, {name}.item_id has {n}")
    if n and _behaviour_ok(out):
        return out  # type: ignore[return-value]
    for i in range(n):   # slow path: find and name the bad element
        _int(out["item_id"][i], f"{name}.item_id[{i}]", minimum=0)
        _float(out["duration_s"][i], f"{name}.duration_s[{i}]", minimum=0.0)
        _float(out["play_time_s"][i], f"{name}.play_time_s[{i}]", minimum=0.0)
        flags = _int(out["flags"][i], f"{name}.flags[{i}]", minimum=0)
        if flags > MAX_FLAGS:
            raise SchemaError(f"{name}.flags[{i}] must be <= {MAX_FLAGS}, got {flags}")
    return out  # type: ignore[return-value]


_INT_ONLY = {int}
_NUMBER_TYPES = {int, float}


def _ints_ok(seq: list, maximum: int | None = None) -> bool:
    """Non-empty `seq` holds only ints (not bools) in 0..maximum (MAX_INT): whole-list C-level checks."""
    if set(map(type, seq)) != _INT_ONLY or min(seq) < 0:
        return False
    return max(seq) <= (MAX_INT if maximum is None else maximum)


def _numbers_ok(seq: list) -> bool:
    """Non-empty `seq` holds only finite ints/floats (not bools) >= 0. A sum that overflows to inf
    only sends a valid list to the slow path; a nan or inf element always does."""
    return set(map(type, seq)) <= _NUMBER_TYPES and min(seq) >= 0 and math.isfinite(sum(seq))


def _behaviour_ok(b: dict) -> bool:
    """Fast whole-list check (the hot path of the join); False sends the caller to the slow path."""
    return (_ints_ok(b["item_id"]) and _ints_ok(b["flags"], MAX_FLAGS)
            and _numbers_ok(b["duration_s"]) and _numbers_ok(b["play_time_s"]))


# Lists of JSON values without bools: orjson decodes JSON to dict, list, str, int, float (always finite),
# bool and None only, and decoded no bool from bytes without `true` / `false`. Among those types each
# check below accepts exactly what the schema does, in one C-level pass (no per-element type()).

def _json_has_no_bools(raw: bytes) -> bool:
    """No `true`/`false` anywhere in these JSON bytes (inside strings counts too: then merely the slower checks)."""
    return b"true" not in raw and b"false" not in raw


def _json_ints_ok(seq: list) -> bool:
    """Ints in 0..MAX_INT."""
    try:
        array("q", seq)   # TypeError for a float, str, list, dict, None; OverflowError outside int64
    except (TypeError, OverflowError):
        return False
    return min(seq) >= 0


def _json_flags_ok(seq: list) -> bool:
    """Ints in 0..MAX_FLAGS = 127, the ASCII range."""
    try:
        return bytes(seq).isascii()   # TypeError for a non-int, ValueError outside 0..255
    except (TypeError, ValueError):
        return False


def _json_numbers_ok(seq: list) -> bool:
    """Non-empty: ints or floats >= 0, finite (min/sum raise TypeError on a str, list, dict or None)."""
    try:
        return min(seq) >= 0 and math.isfinite(sum(seq))
    except (TypeError, OverflowError):
        return False


def _context_ok(context: Any, *, json_without_bools: bool) -> bool:
    """Fast check of a whole context (the hot path); False sends the caller to the slow path, which names
    the field. `json_without_bools`: the context was decoded by orjson from bytes without true/false."""
    if type(context) is not dict:
        return False
    profile, short, long = context.get("profile"), context.get("short"), context.get("long")
    if type(profile) is not list or type(short) is not dict or type(long) is not dict:
        return False
    ints_ok = _json_ints_ok if json_without_bools else _ints_ok
    if profile and not ints_ok(profile):
        return False
    for part in (short, long):
        ids, durations = part.get("item_id"), part.get("duration_s")
        plays, flags = part.get("play_time_s"), part.get("flags")
        if not (type(ids) is list and type(durations) is list and type(plays) is list and type(flags) is list):
            return False
        n = len(ids)
        if len(durations) != n or len(plays) != n or len(flags) != n:
            return False
        if not n:
            continue
        if json_without_bools:
            if not (_json_ints_ok(ids) and _json_flags_ok(flags) and _json_numbers_ok(durations)
                    and _json_numbers_ok(plays)):
                return False
        elif not _behaviour_ok(part):
            return False
    return bool(profile or short["item_id"] or long["item_id"])


def validate_context(context: Any, name: str = "context") -> UserContext:
    """The user context of interfaces.md; at least one token (the profile counts)."""
    return _validate_context(context, name, json_without_bools=False)


def decode_context(raw: bytes) -> UserContext:
    """A user context from its JSON bytes, validated (the join's stage 2 reads contexts as bytes)."""
    return _validate_context(_object(raw, "context"), "context", json_without_bools=_json_has_no_bools(raw))


def _validate_context(context: Any, name: str, *, json_without_bools: bool) -> UserContext:
    if _context_ok(context, json_without_bools=json_without_bools):
        return context  # type: ignore[return-value]
    if not isinstance(context, dict):
        raise SchemaError(f"{name} must be an object with profile, short, long")
    profile = _require(context, "profile", f"{name}.")
    if not isinstance(profile, list):
        raise SchemaError(f"{name}.profile must be a list of integers")
    for i, v in enumerate(profile):
        _int(v, f"{name}.profile[{i}]", minimum=0)
    short = _behaviour(_require(context, "short", f"{name}."), f"{name}.short")
    long = _behaviour(_require(context, "long", f"{name}."), f"{name}.long")
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


def _count_ok(value: Any) -> bool:
    """An int (not a bool) in 0..MAX_INT."""
    return type(value) is int and 0 <= value <= MAX_INT


def _time_ok(value: Any) -> bool:
    """A finite int or float (not a bool) >= 0."""
    return (type(value) is float and 0.0 <= value <= _MAX_FLOAT) or (type(value) is int and value >= 0)


def _items_ok(items: Any, source: str) -> bool:
    """Fast check of an impression's items (the hot path); False sends the caller to the slow path."""
    if type(items) is not list or not items:
        return False
    onerec = source == "onerec"
    seen = set()
    for item in items:
        if type(item) is not dict:
            return False
        item_id, sid, logprob = item.get("item_id"), item.get("semantic_id"), item.get("logprob")
        if not _count_ok(item_id) or item_id in seen or not _time_ok(item.get("duration_s")):
            return False
        seen.add(item_id)
        if sid is None:
            if onerec:
                return False
        elif type(sid) is not list or len(sid) != 3 or not _ints_ok(sid):
            return False
        if onerec:
            if type(logprob) is not float or not -_MAX_FLOAT <= logprob <= 0.0:
                return False   # (an int logprob is valid: the slow path says so)
        elif logprob is not None:
            return False
    return True


def _impression_ok(event: dict) -> bool:
    """Fast check of every field but the context; False sends the caller to the slow path."""
    source = event.get("source")
    rid = event.get("request_id")
    return (type(rid) is str and rid != "" and _count_ok(event.get("user_id")) and _time_ok(event.get("ts"))
            and _count_ok(event.get("model_version")) and source in SOURCES and _items_ok(event.get("items"), source))


def validate_impression(event: dict, *, check_context: bool = True) -> Impression:
    """`check_context=False`: every field but the context (the join's stage 2: stage 1 checked it)."""
    return _validate_impression(event, check_context=check_context, json_without_bools=False)


def _validate_impression(event: dict, *, check_context: bool, json_without_bools: bool) -> Impression:
    if _impression_ok(event):   # the hot path; the checks below name the field when it fails
        if check_context:
            _validate_context(_require(event, "context"), "context", json_without_bools=json_without_bools)
        return event  # type: ignore[return-value]
    _str(_require(event, "request_id"), "request_id")
    _int(_require(event, "user_id"), "user_id", minimum=0)
    _float(_require(event, "ts"), "ts", minimum=0.0)
    _int(_require(event, "model_version"), "model_version", minimum=0)
    source = _require(event, "source")
    if source not in SOURCES:
        raise SchemaError(f"source must be one of {SOURCES}, got {source!r}")
    if check_context:
        validate_context(_require(event, "context"))
    items = _require(event, "items")
    if not isinstance(items, list) or not items:
        raise SchemaError("items must be a non-empty list")
    seen: set[int] = set()
    for i, item in enumerate(items):
        where = f"items[{i}]."
        if not isinstance(item, dict):
            raise SchemaError(f"items[{i}] must be an object")
        item_id = _int(_require(item, "item_id", where), f"{where}item_id", minimum=0)
        if item_id in seen:
            raise SchemaError(f"{where}item_id {item_id} is shown twice in one request")
        seen.add(item_id)
        _semantic_id(item.get("semantic_id"), f"{where}semantic_id", nullable=source == "legacy")
        _float(_require(item, "duration_s", where), f"{where}duration_s", minimum=0.0)
        logprob = item.get("logprob")
        if source == "onerec":
            if logprob is None:
                raise SchemaError(f"{where}logprob is required for source 'onerec'")
            if _float(logprob, f"{where}logprob") > 0:
                raise SchemaError(f"{where}logprob must be <= 0, got {logprob}")
        elif logprob is not None:
            raise SchemaError(f"{where}logprob must be null for source 'legacy'")
    return event  # type: ignore[return-value]


def _feedback_ok(event: dict) -> bool:
    """Fast check of a feedback event (the hot path); False sends the caller to the slow path."""
    rid = event.get("request_id")
    if not (type(rid) is str and rid != "" and _count_ok(event.get("user_id")) and _count_ok(event.get("item_id"))
            and _time_ok(event.get("ts")) and _time_ok(event.get("play_time_s"))
            and type(event.get("dislike")) is bool):
        return False
    for name in OPTIONAL_ACTIONS:
        value = event.get(name, False)
        if value is not True and value is not False:
            return False
    return True


def validate_feedback(event: dict) -> Feedback:
    if _feedback_ok(event):   # the hot path; the checks below name the field when it fails
        return event  # type: ignore[return-value]
    _str(_require(event, "request_id"), "request_id")
    _int(_require(event, "user_id"), "user_id", minimum=0)
    _int(_require(event, "item_id"), "item_id", minimum=0)
    _float(_require(event, "ts"), "ts", minimum=0.0)
    _float(_require(event, "play_time_s"), "play_time_s", minimum=0.0)
    _bool(_require(event, "dislike"), "dislike")
    for name in OPTIONAL_ACTIONS:
        if name in event:
            _bool(event[name], name)
    return event  # type: ignore[return-value]


def validate_sample(event: dict) -> Sample:
    for name in ("request_id", "source"):
        _str(_require(event, name), name)
    _int(_require(event, "user_id"), "user_id", minimum=0)
    _int(_require(event, "item_id"), "item_id", minimum=0)
    _float(_require(event, "ts"), "ts", minimum=0.0)
    _int(_require(event, "model_version"), "model_version", minimum=0)
    validate_context(_require(event, "context"))
    _semantic_id(_require(event, "semantic_id"), "semantic_id", nullable=event["source"] == "legacy")
    _float(_require(event, "duration_s"), "duration_s", minimum=0.0)
    if _require(event, "logprob") is not None:
        _float(event["logprob"], "logprob")
    feedback = _require(event, "feedback")
    if feedback is not None:
        validate_feedback(feedback)
    q = _require(event, "q")
    if q is not None:
        q = _float(q, "q", minimum=0.0)
        if q > 1.0:
            raise SchemaError(f"q must be <= 1, got {q}")
    if (feedback is None) != (q is None):
        raise SchemaError("q must be set exactly when feedback is set")
    _int(_require(event, "duration_bucket"), "duration_bucket")
    return event  # type: ignore[return-value]


def decode_impression(raw: bytes | dict) -> Impression:
    if isinstance(raw, dict):
        return validate_impression(raw)
    return _validate_impression(_object(raw, "impression"), check_context=True,
                                json_without_bools=_json_has_no_bools(raw))


def decode_feedback(raw: bytes | dict) -> Feedback:
    return validate_feedback(_object(raw, "feedback"))


def decode_sample(raw: bytes | dict) -> Sample:
    return validate_sample(_object(raw, "sample"))


def decode_dead_letter(raw: bytes) -> DeadLetter:
    event = _object(raw, "dead letter")
    _str(_require(event, "topic"), "topic")
    _str(_require(event, "reason"), "reason")
    original = _require(event, "original")
    if not isinstance(original, str):
        raise SchemaError("original must be a base64 string")
    _float(_require(event, "ts"), "ts", minimum=0.0)
    return event  # type: ignore[return-value]


def encode_impression(event: Impression) -> bytes:
    return orjson.dumps(validate_impression(event))


def encode_feedback(event: Feedback) -> bytes:
    return orjson.dumps(validate_feedback(event))


def encode_sample(event: Sample) -> bytes:
    return orjson.dumps(validate_sample(event))


def dead_letter(*, topic: str, reason: str, original: bytes, ts: float) -> DeadLetter:
    return {"topic": topic, "reason": reason, "original": base64.b64encode(original).decode("ascii"), "ts": ts}


def encode_dead_letter(event: DeadLetter) -> bytes:
    return orjson.dumps(event)


def dead_letter_original(event: DeadLetter) -> bytes:
    return base64.b64decode(event["original"])


def sample_id(sample: Sample) -> tuple[str, int]:
    """The identity of a sample: at-least-once delivery may repeat it, consumers dedupe on this."""
    return sample["request_id"], sample["item_id"]


def feedback_flags(feedback: Feedback) -> int:
    """Bitmask of interfaces.md (1 like ... 32 dislike) for a feedback event; 64 long view is not in it."""
    return action_flags(feedback)
