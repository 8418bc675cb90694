"""The join's hot-path decoders: msgspec checks the schema while it parses, in C.

Invariant: each function here accepts exactly the events `streaming.schemas` accepts and raises
`SchemaError` with the same reason otherwise. The msgspec structs below accept a subset of what
schemas.py accepts (the same types and ranges; what they cannot say, such as equal list lengths or
no item shown twice, is checked after them); anything they refuse is decoded again by schemas.py's
validators, which either accept it (an impression with members of its own, which the join carries
along) or name the offending field. tests/test_schemas.py compares the two on mutated events.

Why: on the KuaiRand week an impression is ~1.3 KB, most of it the user context; orjson plus the
field checks took ~30 us per impression and re-encoding the context ~10 us more. Here the
impression is parsed with its context kept as raw bytes (`msgspec.Raw`), the context is checked by a
second struct without building dicts, and the join splices those bytes into its records as they
are (a context spread over several lines is re-encoded on one: the join's records are JSON lines).
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


class _Item(msgspec.Struct):
    item_id: Count
    duration_s: Time
    semantic_id: Annotated[list[Count], msgspec.Meta(min_length=3, max_length=3)] | None = None
    logprob: LogProb | None = None


class _Request(msgspec.Struct):
    """The fields of an impression but its context (an impression's head)."""
    request_id: Annotated[str, msgspec.Meta(min_length=1)]
    user_id: Count
    ts: Time
    model_version: Count
    source: Literal["onerec", "legacy"]
    items: Annotated[list[_Item], msgspec.Meta(min_length=1)]


class _Impression(_Request, forbid_unknown_fields=True):   # other members: the slow path keeps them
    context: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET   # required: checked after decoding


class _Feedback(msgspec.Struct):
    request_id: Annotated[str, msgspec.Meta(min_length=1)]
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


class JoinedHead(_Request):
    """Line 1 of a `joined` record, as stage 2 reads it: the impression without its context, and the
    feedback per shown item (item id as a string -> the feedback event's bytes, which samples carry)."""
    feedback: dict[str, msgspec.Raw]


class Sample(msgspec.Struct):
    """A `samples` record (schemas.Sample), with the feedback event and the context as JSON bytes."""
    request_id: str
    user_id: int
    item_id: int
    ts: float
    model_version: int
    source: str
    semantic_id: list[int] | None
    duration_s: float
    logprob: float | None
    feedback: msgspec.Raw | None
    q: float | None
    duration_bucket: int
    context: msgspec.Raw


_IMPRESSION = msgspec.json.Decoder(_Impression)
_CONTEXT = msgspec.json.Decoder(_Context)
_FEEDBACK = msgspec.json.Decoder(_Feedback)
_JOINED_HEAD = msgspec.json.Decoder(JoinedHead)
_ENCODER = msgspec.json.Encoder()
encode_sample = _ENCODER.encode


class ImpressionParts(NamedTuple):
    """A valid impression, as stage 1 of the join keeps it."""
    request_id: str
    user_id: int
    ts: float
    item_ids: tuple[int, ...]
    head: bytes       # the impression without its context: a JSON object on one line
    context: bytes    # its context: a JSON object on one line


def _items_ok(imp: _Request) -> bool:
    """What the types cannot say: no item shown twice; `onerec` items carry a semantic id and a logprob,
    `legacy` items no logprob."""
    if len({item.item_id for item in imp.items}) != len(imp.items):
        return False
    if imp.source == "onerec":
        return all(item.semantic_id is not None and item.logprob is not None for item in imp.items)
    return all(item.logprob is None for item in imp.items)


def _checked_context(raw: bytes) -> _Context | None:
    """The context of these bytes if the fast checks pass, else None (then schemas.py decides)."""
    try:
        context = _CONTEXT.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if (context.short.lengths_ok() and context.long.lengths_ok()
            and (context.profile or context.short.item_id or context.long.item_id)):
        return context
    return None


def split_impression(raw: bytes) -> ImpressionParts:
    """A valid impression from its bytes, split into its head and its context (module docstring);
    raises SchemaError naming the field otherwise."""
    try:
        imp = _IMPRESSION.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        imp = None
    if imp is not None and imp.context is not msgspec.UNSET and _items_ok(imp):
        context = bytes(imp.context)
        if _checked_context(context) is not None:
            if b"\n" in context:
                context = orjson.dumps(orjson.loads(context))
            head = _ENCODER.encode(msgspec.structs.replace(imp, context=msgspec.UNSET))
            return ImpressionParts(imp.request_id, imp.user_id, imp.ts, tuple([item.item_id for item in imp.items]),
                                   head, context)
    event = dict(schemas.decode_impression(raw))   # the slow path: names the field, or accepts an edge case
    context = orjson.dumps(event.pop("context"))
    return ImpressionParts(event["request_id"], event["user_id"], event["ts"],
                           tuple([item["item_id"] for item in event["items"]]), orjson.dumps(event), context)


def context_plays(raw: bytes) -> tuple[list[float], list[float]]:
    """(duration_s, play_time_s) of a context's long then short behaviour, from its bytes: what a new
    user's history starts from. Checks the whole context (SchemaError naming the field)."""
    context = _checked_context(raw)
    if context is not None:
        long, short = context.long, context.short
        return long.duration_s + short.duration_s, long.play_time_s + short.play_time_s
    context = schemas.decode_context(raw)
    return (context["long"]["duration_s"] + context["short"]["duration_s"],
            context["long"]["play_time_s"] + context["short"]["play_time_s"])


class JoinedRequest(NamedTuple):
    """A valid joined record's line 1, as stage 2 scores it."""
    head: JoinedHead
    play_times: dict[str, float]   # item id (string) -> play_time_s of its feedback


def decode_joined_head(raw: bytes) -> JoinedRequest:
    """Line 1 of a joined record: every field but the context checked (stage 1 checked the context), each
    feedback a valid feedback event; raises SchemaError naming the field otherwise."""
    try:
        head = _JOINED_HEAD.decode(raw)
        if _items_ok(head):
            return JoinedRequest(head, {item: _FEEDBACK.decode(event).play_time_s
                                        for item, event in head.feedback.items()})
        problem = "items do not match the source"
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        problem = str(exc)
    try:   # the slow path names the field
        joined = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"joined record: not valid JSON ({exc})") from None
    if not isinstance(joined, dict):
        raise SchemaError("joined record must be a JSON object, then its context on a second line")
    schemas.validate_impression(joined, check_context=False)
    feedback = joined.get("feedback")
    if not isinstance(feedback, dict):
        raise SchemaError("feedback must be an object of item_id -> feedback")
    for item, event in feedback.items():
        if not isinstance(event, dict):
            raise SchemaError(f"feedback[{item!r}] must be a feedback event")
        schemas.validate_feedback(event)
    raise SchemaError(f"joined record: {problem}")
