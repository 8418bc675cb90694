"""Event schemas: valid events round-trip; every bad field raises SchemaError naming it."""
import copy

import orjson
import pytest

from streaming import schemas
from streaming.schemas import SchemaError

BEH = {"item_id": [12, 99], "duration_s": [31.0, 8.5], "play_time_s": [30.2, 1.0], "flags": [1, 0]}
EMPTY = {"item_id": [], "duration_s": [], "play_time_s": [], "flags": []}


def impression(**over):
    event = {"request_id": "r1", "user_id": 7, "ts": 1700000000.5, "model_version": 4, "source": "onerec",
             "context": {"profile": [3, 0, 17, 5], "short": copy.deepcopy(BEH), "long": copy.deepcopy(EMPTY)},
             "items": [{"item_id": 5, "semantic_id": [1, 2, 3], "duration_s": 12.0, "logprob": -1.5},
                       {"item_id": 6, "semantic_id": [1, 2, 4], "duration_s": 40.0, "logprob": -2.0}]}
    event.update(over)
    return event


def feedback(**over):
    event = {"request_id": "r1", "user_id": 7, "item_id": 5, "ts": 1700000003.0, "play_time_s": 10.0,
             "dislike": False, "like": True}
    event.update(over)
    return event


def test_roundtrip():
    imp, fb = impression(), feedback()
    assert schemas.decode_impression(schemas.encode_impression(imp)) == imp
    assert schemas.decode_feedback(schemas.encode_feedback(fb)) == fb
    sample = {"request_id": "r1", "user_id": 7, "item_id": 5, "ts": imp["ts"], "model_version": 4, "source": "onerec",
              "context": imp["context"], "semantic_id": [1, 2, 3], "duration_s": 12.0, "logprob": -1.5,
              "feedback": fb, "q": 0.75, "duration_bucket": 3}
    assert schemas.decode_sample(schemas.encode_sample(sample)) == sample
    assert schemas.sample_id(sample) == ("r1", 5)
    letter = schemas.dead_letter(topic="feedback", reason="x must be y", original=b"\x00\xffbytes", ts=1.0)
    decoded = schemas.decode_dead_letter(schemas.encode_dead_letter(letter))
    assert schemas.dead_letter_original(decoded) == b"\x00\xffbytes"


def test_legacy_traffic_has_null_logprob_and_may_have_null_semantic_id():
    imp = impression(source="legacy", items=[{"item_id": 5, "semantic_id": None, "duration_s": 3.0, "logprob": None}])
    assert schemas.decode_impression(orjson.dumps(imp)) == imp
    with pytest.raises(SchemaError, match=r"items\[0\]\.logprob must be null for source 'legacy'"):
        schemas.decode_impression(orjson.dumps(impression(source="legacy")))
    with pytest.raises(SchemaError, match=r"items\[0\]\.semantic_id is required for source 'onerec'"):
        schemas.decode_impression(orjson.dumps(impression(items=[{"item_id": 5, "semantic_id": None,
                                                                    "duration_s": 3.0, "logprob": -1.0}])))


def _with(event, path, value):
    event = copy.deepcopy(event)
    target = event
    for part in path[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return event


@pytest.mark.parametrize("path,value,message", [
    (("request_id",), KeyError, "request_id is required"),
    (("request_id",), "", "request_id must be a non-empty string"),
    (("user_id",), -3, "user_id must be >= 0"),
    (("user_id",), "7", "user_id must be an integer"),
    (("ts",), float("nan"), "ts must be finite"),
    (("model_version",), True, "model_version must be an integer"),
    (("source",), "other", "source must be one of"),
    (("context", "profile", 1), -1, r"context.profile\[1\] must be >= 0"),
    (("context", "short", "flags"), [1], "context.short.flags has length 1"),
    (("context", "short", "play_time_s", 0), -1.0, r"context.short.play_time_s\[0\] must be >= 0"),
    (("context", "short", "flags", 1), 128, r"context.short.flags\[1\] must be <= 127"),
    (("context", "long"), KeyError, "context.long is required"),
    (("items",), [], "items must be a non-empty list"),
    (("items", 1, "item_id"), 5, r"items\[1\].item_id 5 is shown twice"),
    (("items", 0, "semantic_id"), [1, 2], r"items\[0\].semantic_id must be a list of 3"),
    (("items", 0, "semantic_id", 2), -4, r"items\[0\].semantic_id\[2\] must be >= 0"),
    (("items", 0, "duration_s"), "long", r"items\[0\].duration_s must be a number"),
    (("items", 1, "logprob"), 0.5, r"items\[1\].logprob must be <= 0"),
    (("items", 1, "logprob"), None, r"items\[1\].logprob is required for source 'onerec'"),
])
def test_impression_errors_name_the_field(path, value, message):
    with pytest.raises(SchemaError, match=message) as info:
        schemas.decode_impression(_with(impression(), path, value))
    assert info.value.reason == str(info.value)


def test_context_needs_a_token():
    ctx = {"profile": [], "short": EMPTY, "long": EMPTY}
    with pytest.raises(SchemaError, match="at least one token"):
        schemas.validate_context(ctx)
    schemas.validate_context({"profile": [], "short": BEH, "long": EMPTY})


@pytest.mark.parametrize("path,value,message", [
    (("item_id",), KeyError, "item_id is required"),
    (("play_time_s",), -0.1, "play_time_s must be >= 0"),
    (("play_time_s",), float("inf"), "play_time_s must be finite"),
    (("dislike",), 0, "dislike must be a boolean"),
    (("like",), "yes", "like must be a boolean"),
])
def test_feedback_errors_name_the_field(path, value, message):
    with pytest.raises(SchemaError, match=message):
        schemas.decode_feedback(_with(feedback(), path, value))


@pytest.mark.parametrize("raw,message", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "not valid JSON"),
])
def test_malformed_bytes(raw, message):
    with pytest.raises(SchemaError, match=message):
        schemas.decode_feedback(raw)


def test_encode_refuses_bad_events():
    with pytest.raises(SchemaError, match="user_id"):
        schemas.encode_feedback(feedback(user_id=None))


def test_feedback_flags():
    from learner.flags import action_flags   # the one table of flag bits

    assert action_flags(feedback(like=True, dislike=True, forward=True)) == 1 | 32 | 8


# --- the fast paths (whole-list checks) must accept and reject exactly what the field-by-field checks do

BAD_VALUES = [True, False, None, -1, -0.5, 1.5, 0, 127, 128, 2**63, "7", [1], {}, 1e308, 2.0]


def _mutations(rng, event, n):
    """`n` copies of `event` with one value somewhere replaced by a suspicious one."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        if path:
            paths.append(path)

    walk(event, ())
    for _ in range(n):
        path = paths[rng.integers(len(paths))]
        value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        yield _with(event, path, value)


def _outcome(check, event):
    try:
        check(event)
    except SchemaError as exc:
        return exc.reason
    return "ok"


def sample(**over):
    event = {"request_id": "r1", "user_id": 7, "item_id": 5, "ts": 1700000000.5, "model_version": 4, "source": "onerec",
             "context": impression()["context"], "semantic_id": [1, 2, 3], "duration_s": 12.0, "logprob": -1.5,
             "feedback": feedback(), "q": 0.25, "duration_bucket": 3, "arm": "b"}
    event.update(over)
    return event


def _reference(kind):
    """The reference validator of `kind` over bytes (the field-by-field checks, nothing of msgspec)."""
    check = {"impression": schemas.validate_impression, "context": schemas.validate_context,
             "feedback": schemas.validate_feedback, "sample": schemas.validate_sample}[kind]
    return lambda raw: check(schemas.json_object(raw, kind))


def test_fast_checks_agree_with_the_field_by_field_checks():
    """`decode_*` (msgspec first, the reference only when it refuses) against the reference alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    long_beh = {"item_id": [3, 0, 9], "duration_s": [1.0, 0, 7.5], "play_time_s": [0.0, 2, 1.25], "flags": [0, 64, 127]}
    events = [impression(), impression(source="legacy", items=[{"item_id": 5, "semantic_id": None, "duration_s": 3,
                                                                 "logprob": None}]),
              _with(impression(), ("context", "long"), long_beh), impression(arm="a")]
    cases = []   # (kind, bytes)
    for event in events:
        for mutated in _mutations(rng, event, 400):
            cases.append(("impression", orjson.dumps(mutated)))
            cases.append(("context", orjson.dumps(mutated["context"]) if isinstance(mutated.get("context"), dict)
                          else b"[]"))
    for mutated in _mutations(rng, feedback(), 200):
        cases.append(("feedback", orjson.dumps(mutated)))
    for event in (sample(), sample(source="legacy", semantic_id=None, logprob=None, feedback=None, q=None)):
        for mutated in _mutations(rng, event, 400):
            cases.append(("sample", orjson.dumps(mutated)))
    fast_decode = {"impression": schemas.decode_impression, "context": schemas.decode_context,
                   "feedback": schemas.decode_feedback, "sample": schemas.decode_sample}
    fast = [_outcome(fast_decode[kind], raw) for kind, raw in cases]
    slow = [_outcome(_reference(kind), raw) for kind, raw in cases]
    assert fast == slow
    assert 0.2 < fast.count("ok") / len(fast) < 0.8     # both kinds of outcome were exercised
    for kind in fast_decode:                           # and for every kind
        outcomes = [f for (k, _), f in zip(cases, fast) if k == kind]
        assert "ok" in outcomes and any(o != "ok" for o in outcomes), kind


def test_bools_are_not_integers_on_the_fast_path():
    for path in [("context", "short", "item_id", 0), ("context", "short", "flags", 1), ("context", "profile", 0),
                 ("context", "short", "duration_s", 0)]:
        raw = orjson.dumps(_with(impression(), path, True))
        with pytest.raises(SchemaError, match=r"\[\d\] must be (an integer|a number), got bool"):
            schemas.decode_impression(raw)
    assert schemas.decode_context(orjson.dumps({"profile": [1], "short": BEH, "long": EMPTY, "note": True}))


# --- the join's msgspec decoders (streaming/fast_schemas.py) against the reference validators

def _shared(event: dict) -> dict:
    """The members every sample of a valid impression shares: all but its items and context, `arm` null
    when it had none."""
    members = {k: v for k, v in event.items() if k not in ("items", "context")}
    members.setdefault("arm", None)
    return members


def _reference_but_context(raw: bytes) -> None:
    """What the join's `split_impression` accepts: the reference check of all but the context, which must
    be an object (the join reads it only for a new user: `context_plays` checks it then)."""
    event = schemas.json_object(raw, "impression")
    schemas.validate_impression(event, check_context=False)
    if not isinstance(schemas.require(event, "context"), dict):
        raise SchemaError("context must be an object with profile, short, long")


def test_the_joins_fast_decoders_accept_and_reject_what_the_schemas_do():
    import numpy as np

    from streaming.fast_schemas import context_plays, split_impression

    rng = np.random.default_rng(1)
    legacy = impression(source="legacy", items=[{"item_id": 5, "duration_s": 3}])
    events = [impression(), legacy, impression(note="kept"), impression(ts=17), impression(user_id=2**64 - 1),
              impression(arm="control")]
    huge = orjson.dumps(impression()).replace(b'"user_id":7', b'"user_id":' + str(2**70).encode())
    cases = [orjson.dumps(e) for e in events] + [huge, b"{", b"[]", b'{"request_id": "r1"}']
    for event in events[:2]:
        cases += [orjson.dumps(mutated) for mutated in _mutations(rng, event, 500)]
    outcomes = []
    for raw in cases:
        expected = _outcome(_reference_but_context, raw)
        assert _outcome(split_impression, raw) == expected, raw
        outcomes.append(expected)
        if expected == "ok":
            parts = split_impression(raw)
            event = orjson.loads(raw)
            assert b"\n" not in parts.shared + parts.context
            assert orjson.loads(parts.shared) == _shared(event) and orjson.loads(parts.context) == event["context"]
            assert (parts.request_id, parts.user_id, parts.ts) == (event["request_id"], event["user_id"], event["ts"])
            assert [(i.item_id, i.duration_s, i.semantic_id, i.logprob) for i in parts.items] == [
                (i["item_id"], i["duration_s"], i.get("semantic_id"), i.get("logprob")) for i in event["items"]]
            context = event["context"]
            assert _outcome(context_plays, parts.context) == _outcome(_reference("context"), parts.context)
            if _outcome(context_plays, parts.context) != "ok":
                continue
            durations, plays = context_plays(parts.context)
            assert durations == context["long"]["duration_s"] + context["short"]["duration_s"]
            assert plays == context["long"]["play_time_s"] + context["short"]["play_time_s"]
        event = orjson.loads(raw) if raw.startswith(b'{"') else None
        if event is not None and isinstance(event.get("context"), dict):
            context_raw = orjson.dumps(event["context"])
            assert _outcome(context_plays, context_raw) == _outcome(_reference("context"), context_raw)
    assert 0.1 < outcomes.count("ok") / len(outcomes) < 0.9     # both kinds of outcome were exercised


def test_the_fast_path_serves_plain_impressions_and_keeps_context_bytes(monkeypatch):
    import json

    from streaming import fast_schemas

    def slow_path(raw):
        raise AssertionError("a plain impression went to the slow path")

    monkeypatch.setattr(fast_schemas.schemas, "decode_impression", slow_path)
    raw = orjson.dumps(impression())
    parts = fast_schemas.split_impression(raw)
    assert parts.context == orjson.dumps(impression()["context"])       # the producer's bytes, as they were
    assert raw.find(parts.context) > 0
    # a context spread over lines is written on one line (the join's records are JSON lines)
    event = impression()
    spread = raw.replace(orjson.dumps(event["context"]), json.dumps(event["context"], indent=1).encode())
    assert b"\n" in spread
    assert orjson.loads(fast_schemas.split_impression(spread).context) == event["context"]
    assert b"\n" not in fast_schemas.split_impression(spread).context
