"""The one fast path of the event schemas: msgspec checks types and ranges while it parses, in C.

Invariant: each decoder here accepts exactly the events that `streaming.schemas`' reference
validators accept and raises `SchemaError` with the reference's reason otherwise (`split_impression`:
the reference's `validate_impression(check_context=False)`, and a context that is an object). The msgspec
structs accept a subset of what the reference accepts (the same types and ranges; what they cannot
say, such as equal list lengths or no item shown twice, is checked right after them); anything they
refuse goes to the reference validator, which either accepts it (e.g. an event with members of its
own) or names the offending field. tests/test_schemas.py compares the two on mutated events.

What the join keeps of an impression (`split_impression`): its context as the producer's bytes
(`msgspec.Raw`; checked where it was produced, read by the join only for a new user), its shown items decoded, and the
members that every sample of the request shares (`shared`: request_id, user_id, ts, model_version,
source, arm and any member of the impression's own), encoded once. A sample is then one small
per-item struct spliced onto those bytes (`sample_bytes`): the context is never re-encoded.
"""
from __future__ import annotations

import sys
from typing import Annotated, Literal, NamedTuple

import msgspec
import orjson

from streaming import schemas
from streaming.schemas import SchemaError

Count = Annotated[int, msgspec.Meta(ge=0, le=schemas.MAX_INT)]
Time = Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]     # finite, >= 0 (ints accepted)
Flags = Annotated[int, msgspec.Meta(ge=0, le=schemas.MAX_FLAGS)]
LogProb = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=0.0)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
RequestId = Annotated[str, msgspec.Meta(min_length=1)]


class _Behaviour(msgspec.Struct):
    item_id: list[Count]
    duration_s: list[Time]
    play_time_s: list[Time]
    flags: list[Flags]

    def lengths_ok(self) -> bool:
        n = len(self.item_id)
        return len(self.duration_s) == n and len(self.play_time_s) == n and len(self.flags) == n


class _Context(msgspec.Struct):
    profile: list[Count]
    short: _Behaviour
    long: _Behaviour


class Item(msgspec.Struct):
    """A shown item."""
    item_id: Count
    duration_s: Time
    semantic_id: Annotated[list[Count], msgspec.Meta(min_length=3, max_length=3)] | None = None
    logprob: LogProb | None = None


class _Impression(msgspec.Struct, forbid_unknown_fields=True):   # other members: the reference keeps them
    request_id: RequestId
    user_id: Count
    ts: Time
    model_version: Count
    source: Literal["onerec", "legacy"]
    items: Annotated[list[Item], msgspec.Meta(min_length=1)]
    context: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET   # required: checked after decoding
    arm: str | None = None


class _Shared(msgspec.Struct):
    """The members every sample of one request shares (the impression but its items and context)."""
    request_id: str
    user_id: int
    ts: float
    model_version: int
    source: str
    arm: str | None


class Feedback(msgspec.Struct):
    request_id: RequestId
    user_id: Count
    item_id: Count
    ts: Time
    play_time_s: Time
    dislike: bool
    like: bool = False
    follow: bool = False
    comment: bool = False
    forward: bool = False
    collect: bool = False


class SampleItem(msgspec.Struct):
    """The per-item members of a sample (the rest is the request's `shared` bytes and its context)."""
    item_id: int
    semantic_id: list[int] | None
    duration_s: float
    logprob: float | None
    feedback: msgspec.Raw | None
    q: float | None
    duration_bucket: int


class _Sample(msgspec.Struct):
    request_id: RequestId
    user_id: Count
    item_id: Count
    ts: Time
    model_version: Count
    source: RequestId
    context: _Context
    semantic_id: Annotated[list[Count], msgspec.Meta(min_length=3, max_length=3)] | None
    duration_s: Time
    logprob: Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)] | None
    feedback: Feedback | None
    q: Rate | None
    duration_bucket: Annotated[int, msgspec.Meta(ge=-schemas.MAX_INT - 1, le=schemas.MAX_INT)]
    arm: str | None = None


_IMPRESSION = msgspec.json.Decoder(_Impression)
_CONTEXT = msgspec.json.Decoder(_Context)
_FEEDBACK = msgspec.json.Decoder(Feedback)
_SAMPLE = msgspec.json.Decoder(_Sample)
_ITEMS = msgspec.json.Decoder(list[Item])
_ENCODER = msgspec.json.Encoder()
encode = _ENCODER.encode
SAMPLE_ITEM_MEMBERS = frozenset(SampleItem.__struct_fields__) | {"items", "context"}


class ImpressionParts(NamedTuple):
    """A valid impression, as the join keeps it (module docstring)."""
    request_id: str
    user_id: int
    ts: float
    items: list[Item]
    shared: bytes     # JSON object: the members every sample of the request shares
    context: bytes    # the context: a JSON object on one line


def _items_ok(source: str, items: list[Item]) -> bool:
    """What the types cannot say: no item shown twice; `onerec` items carry a semantic id and a logprob,
    `legacy` items no logprob."""
    if len({item.item_id for item in items}) != len(items):
        return False
    if source == "onerec":
        return all(item.semantic_id is not None and item.logprob is not None for item in items)
    return all(item.logprob is None for item in items)


def _checked_context(raw: bytes) -> _Context | None:
    """The context of these bytes if the fast checks pass, else None (then the reference decides)."""
    try:
        context = _CONTEXT.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if (context.short.lengths_ok() and context.long.lengths_ok()
            and (context.profile or context.short.item_id or context.long.item_id)):
        return context
    return None


def split_impression(raw: bytes) -> ImpressionParts:
    """A valid impression from its bytes, split for the join (module docstring); raises SchemaError
    naming the field otherwise. Its context must be a JSON object but is not checked further here: it
    was checked where the impression was produced (`schemas.encode_impression`), the join reads it only
    for a new user (`context_plays`, which checks it), and the learner checks what it trains on."""
    try:
        imp = _IMPRESSION.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        imp = None
    if imp is not None and imp.context is not msgspec.UNSET and _items_ok(imp.source, imp.items):
        context = bytes(imp.context)
        if context.startswith(b"{"):
            if b"\n" in context:
                context = orjson.dumps(orjson.loads(context))
            shared = encode(_Shared(imp.request_id, imp.user_id, imp.ts, imp.model_version, imp.source, imp.arm))
            return ImpressionParts(imp.request_id, imp.user_id, imp.ts, imp.items, shared, context)
    event = schemas.json_object(raw, "impression")   # the reference names the field
    schemas.validate_impression(event, check_context=False)
    context = schemas.require(event, "context")
    if not isinstance(context, dict):
        raise SchemaError("context must be an object with profile, short, long")
    members = {k: v for k, v in event.items() if k not in SAMPLE_ITEM_MEMBERS}
    members.setdefault("arm", None)
    items = msgspec.convert(event["items"], list[Item])
    return ImpressionParts(event["request_id"], event["user_id"], event["ts"], items, orjson.dumps(members),
                           orjson.dumps(context))


def decode_items(raw: bytes) -> list[Item]:
    """The shown items the join stored (`encode(items)`)."""
    return _ITEMS.decode(raw)


def context_plays(raw: bytes) -> tuple[list[float], list[float]]:
    """(duration_s, play_time_s) of a context's long then short behaviour, from its bytes: what a new
    user's history starts from. Checks the whole context (SchemaError naming the field)."""
    context = _checked_context(raw)
    if context is None:
        checked = schemas.decode_context(raw)
        return (checked["long"]["duration_s"] + checked["short"]["duration_s"],
                checked["long"]["play_time_s"] + checked["short"]["play_time_s"])
    long, short = context.long, context.short
    return long.duration_s + short.duration_s, long.play_time_s + short.play_time_s


def decode_context(raw: bytes) -> None:
    """Check a context's bytes (None if valid; SchemaError naming the field otherwise)."""
    if _checked_context(raw) is None:
        schemas.validate_context(schemas.json_object(raw, "context"))


def decode_feedback(raw: bytes) -> Feedback:
    """A valid feedback event (a struct); SchemaError naming the field otherwise."""
    try:
        return _FEEDBACK.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    return msgspec.convert(schemas.validate_feedback(schemas.json_object(raw, "feedback")), Feedback)


def check_sample(raw: bytes) -> bool:
    """Whether the fast checks accept these sample bytes (False: the reference decides)."""
    try:
        sample = _SAMPLE.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    context = sample.context
    return (context.short.lengths_ok() and context.long.lengths_ok()
            and bool(context.profile or context.short.item_id or context.long.item_id)
            and (sample.semantic_id is not None or sample.source == "legacy")
            and (sample.feedback is None) == (sample.q is None))


def check_impression(raw: bytes) -> bool:
    """Whether the fast checks accept these impression bytes as they are (False: the reference decides)."""
    try:
        imp = _IMPRESSION.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    return (imp.context is not msgspec.UNSET and _items_ok(imp.source, imp.items)
            and _checked_context(bytes(imp.context)) is not None)


def sample_tail(shared: bytes, context: bytes) -> bytes:
    """The bytes every sample of a request ends with: `shared`'s members, then the context, then `}`."""
    return b"".join((shared[1:-1], b',"context":', context, b"}"))


def sample_bytes(item: SampleItem, tail: bytes) -> bytes:
    """One sample: the per-item members, then the request's `sample_tail`."""
    return b"".join((encode(item)[:-1], b",", tail))
