"""The join's state machines without a broker (streaming/join.py), and the scoring agent under
Faust's `test_context`."""
from __future__ import annotations

import asyncio
import copy

import orjson

from streaming import schemas
from streaming.config import StreamConfig
from streaming.join import WATERMARK_KEY, RequestJoiner, UserScorer, watermark_heartbeat

EMPTY = {"item_id": [], "duration_s": [], "play_time_s": [], "flags": []}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def imp(rid, user, ts, items=(1, 2)):
    return schemas.encode_impression({
        "request_id": rid, "user_id": user, "ts": ts, "model_version": 1, "source": "legacy",
        "context": {"profile": [1], "short": EMPTY, "long": EMPTY},
        "items": [{"item_id": i, "semantic_id": None, "duration_s": 10.0, "logprob": None} for i in items]})


def fb(rid, user, item, ts, play=5.0):
    return schemas.encode_feedback({"request_id": rid, "user_id": user, "item_id": item, "ts": ts,
                                    "play_time_s": play, "dislike": False})


def joiner(clock=None, **cfg):
    cfg = StreamConfig(**{"feedback_window_s": 30.0, "idle_close_s": 5.0, **cfg})
    return RequestJoiner(cfg, {"impressions": {}, "feedback": {}, "closed": {}}, wall_clock=clock or Clock())


def joined_of(batch):
    return [orjson.loads(o.value) for o in batch.outputs if o.kind == "joined"]


def test_feedback_before_impression_joins_and_window_closes_on_watermark():
    j = joiner()
    j.on_message("feedback", 0, b"a", fb("a", 1, 2, 101.0))
    j.on_message("impressions", 0, b"a", imp("a", 1, 100.0))
    j.close_due()
    assert joined_of(j.drain()) == []            # watermark 100..101 < 130
    j.on_message("impressions", 0, b"b", imp("b", 1, 131.0))
    j.on_message("feedback", 0, b"b", fb("b", 1, 1, 131.5))
    j.close_due()
    out = joined_of(j.drain())
    assert [r["request_id"] for r in out] == ["a"]
    assert set(out[0]["feedback"]) == {"2"} and out[0]["feedback"]["2"]["ts"] == 101.0


def test_a_lagging_input_holds_the_watermark():
    """Impressions read far ahead of feedback must not close windows whose feedback is unread."""
    j = joiner()
    j.on_message("impressions", 0, b"a", imp("a", 1, 100.0))
    j.on_message("feedback", 0, b"x", fb("x", 1, 1, 100.5))          # feedback input at 100.5
    j.on_message("impressions", 0, b"b", imp("b", 1, 500.0))        # impressions input at 500
    j.close_due()
    assert joined_of(j.drain()) == []
    j.on_message("feedback", 0, b"a", fb("a", 1, 1, 102.0))
    j.on_message("feedback", 0, b"b", fb("b", 1, 1, 501.0))
    j.close_due()
    out = joined_of(j.drain())
    assert [r["request_id"] for r in out] == ["a"] and "1" in out[0]["feedback"]


def test_idle_partition_closes_on_wall_clock():
    clock = Clock()
    j = joiner(clock)
    j.on_message("impressions", 1, b"a", imp("a", 1, 100.0))
    j.on_message("feedback", 1, b"a", fb("a", 1, 1, 101.0))
    j.close_due()
    assert joined_of(j.drain()) == []
    clock.t += 6.0                                 # > idle_close_s: both inputs idle
    j.on_message("ticks", 1, b"tick", b"0")
    j.close_due()
    batch = j.drain()
    assert [r["request_id"] for r in joined_of(batch)] == ["a"]
    assert batch.closed_through[1] >= 1e18          # stage 2 may release everything


def test_replaying_a_batch_against_the_old_state_gives_the_same_outputs():
    """A crash after the outputs but before the changelog: the batch runs again on the old state."""
    j = joiner()
    first = [("impressions", b"a", imp("a", 1, 100.0)), ("feedback", b"a", fb("a", 1, 1, 101.0))]
    for kind, key, raw in first:
        j.on_message(kind, 0, key, raw)
    j.close_due()
    j.drain()
    before = copy.deepcopy(j.stores)
    second = [("impressions", b"b", imp("b", 2, 140.0)), ("feedback", b"b", fb("b", 2, 2, 141.0))]
    for kind, key, raw in second:
        j.on_message(kind, 0, key, raw)
    j.close_due()
    outputs = [(o.kind, o.key, o.value) for o in j.drain().outputs]
    assert [orjson.loads(v)["request_id"] for k, _, v in outputs if k == "joined"] == ["a"]

    again = joiner()
    for name, store in before.items():
        again.stores[name].update(store)
    for kind, key, raw in first[1:] + second:      # redelivered from the last committed offset
        again.on_message(kind, 0, key, raw)
    again.close_due()
    assert [(o.kind, o.key, o.value) for o in again.drain().outputs] == outputs
    # and once the state is committed, the same inputs once more produce nothing new
    for kind, key, raw in second:
        j.on_message(kind, 0, key, raw)
    j.close_due()
    assert j.drain().outputs == []


def scorer(**cfg):
    return UserScorer(StreamConfig(**{"partitions": 2, "history_len": 3, **cfg}), {"users": {}, "waiting": {}})


def joined_record(rid, user, ts, plays):
    record = orjson.loads(imp(rid, user, ts, items=tuple(range(len(plays)))))
    record["feedback"] = {str(i): orjson.loads(fb(rid, user, i, ts + 1, p)) for i, p in enumerate(plays) if p is not None}
    return orjson.dumps(record)


def scores(s: UserScorer):
    return {(d["request_id"], d["item_id"]): d["q"] for d in (orjson.loads(o.value) for o in s.drain().outputs)}


def test_scorer_waits_for_every_partition_and_scores_in_ts_order():
    records = [joined_record("r1", 9, 100.0, [4.0]), joined_record("r2", 9, 200.0, [8.0, 2.0]),
               joined_record("r3", 9, 300.0, [5.0, None])]
    in_order = scorer()
    for raw in records:
        in_order.on_joined(0, b"9", raw)
    for src in range(2):
        in_order.on_joined(0, WATERMARK_KEY, watermark_heartbeat(src, 1e18))
    in_order.release()
    expected = scores(in_order)
    # same bucket (10 s): r1 has no history -> 0.5; r2: {4} -> 8: 1.0, 2: 0.0; r3: {4, 8, 2} -> 5: 2/3
    assert expected == {("r1", 0): 0.5, ("r2", 0): 1.0, ("r2", 1): 0.0, ("r3", 0): 2 / 3, ("r3", 1): None}

    shuffled = scorer()
    for raw in (records[2], records[0]):
        shuffled.on_joined(0, b"9", raw)
    shuffled.on_joined(0, WATERMARK_KEY, watermark_heartbeat(0, 1e18))
    shuffled.release()
    assert scores(shuffled) == {}                  # partition 1 has not closed anything yet
    shuffled.on_joined(0, WATERMARK_KEY, watermark_heartbeat(1, 150.0))
    shuffled.release()
    released = scores(shuffled)
    assert released == {("r1", 0): 0.5}           # 100 + 30 <= 150 everywhere; r3 must wait for r2
    shuffled.on_joined(0, b"9", records[1])        # r2 closes late on partition 1
    shuffled.on_joined(0, WATERMARK_KEY, watermark_heartbeat(1, 1e18))
    shuffled.release()
    released.update(scores(shuffled))
    assert released == expected                    # the close order did not change q
    state = orjson.loads(shuffled.stores["users"][b"9"])
    assert len(state["h"]) == 3 and [h[1] for h in state["h"]] == [8.0, 2.0, 5.0]   # bounded, newest kept
    shuffled.on_joined(0, b"9", records[0])        # a redelivered request is dropped
    shuffled.release()
    assert scores(shuffled) == {} and shuffled.stats.duplicates == 1


def test_scoring_agent_under_faust_test_context():
    from streaming.app import JoinWorker

    async def run():
        worker = JoinWorker(StreamConfig(namespace="unit", batch_within_s=0.01))
        worker.app.finalize()
        worker.app.flow_control.resume()
        committed = []

        async def capture(batch):
            committed.extend(batch.outputs)

        worker.commit = capture          # the agent's output step, captured instead of produced
        async with worker.app.agents["score_samples"].test_context() as agent:
            await agent.put(joined_record("r1", 3, 100.0, [4.0, None]), key=b"3", partition=0)
            await asyncio.sleep(0.05)
            assert committed == []
            for src in range(worker.cfg.partitions):
                await agent.put(watermark_heartbeat(src, 1e18), key=WATERMARK_KEY, partition=0)
            for _ in range(50):
                if committed:
                    break
                await asyncio.sleep(0.02)
        consumer = worker.app._consumer   # created by the stream; its (never started) thread made a loop
        if consumer is not None:
            consumer._thread.thread_loop.close()
        samples = [schemas.decode_sample(o.value) for o in committed]
        assert [(s["item_id"], s["q"]) for s in samples] == [(0, 0.5), (1, None)]

    loop = asyncio.new_event_loop()   # Faust's services bind to the loop current at creation
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def replay_changelog(batches, tables):
    """The stores a restart restores: every batch's writes applied in order to empty tables."""
    stores = {t: {} for t in tables}
    for batch in batches:
        for w in batch.writes.values():
            if w.value is None:
                stores[w.table].pop(w.key, None)
            else:
                stores[w.table][w.key] = w.value
    return stores


def test_changelog_restores_the_state_and_skips_keys_born_and_gone_in_one_batch():
    j = joiner()
    batches = []
    # batch 1: "a" opens and closes in it; "b" stays open
    for kind, key, raw in [("impressions", b"a", imp("a", 1, 100.0)), ("feedback", b"a", fb("a", 1, 1, 101.0)),
                           ("impressions", b"b", imp("b", 1, 120.0)), ("feedback", b"b", fb("b", 1, 2, 121.0)),
                           ("impressions", b"c", imp("c", 2, 140.0)), ("feedback", b"c", fb("c", 2, 1, 141.0))]:
        j.on_message(kind, 0, key, raw)
    j.close_due()
    batches.append(j.drain())
    slots = {(w.table, w.key, w.value is None) for w in batches[0].writes.values()}
    assert ("impressions", b"a", True) not in slots and ("feedback", b"a", True) not in slots  # never written
    assert ("closed", b"a", False) in slots and ("impressions", b"b", False) in slots
    assert replay_changelog(batches, RequestJoiner.tables) == j.stores
    # batch 2: "b" closes now: its earlier records need tombstones
    j.on_message("impressions", 0, b"d", imp("d", 1, 200.0))
    j.on_message("feedback", 0, b"d", fb("d", 1, 1, 200.5))
    j.close_due()
    batches.append(j.drain())
    slots = {(w.table, w.key, w.value is None) for w in batches[1].writes.values()}
    assert {("impressions", b"b", True), ("feedback", b"b", True), ("closed", b"b", False)} <= slots
    assert replay_changelog(batches, RequestJoiner.tables) == j.stores


def test_scorer_changelog_restores_the_state():
    s = scorer()
    batches = []
    s.on_joined(0, b"9", joined_record("r1", 9, 100.0, [4.0]))
    batches.append(s.drain())                            # r1 waits: no heartbeat yet
    assert any(w.table == "waiting" for w in batches[0].writes.values())
    for src in range(s.cfg.partitions):
        s.on_joined(0, WATERMARK_KEY, watermark_heartbeat(src, 1e18))
    s.on_joined(0, b"9", joined_record("r2", 9, 200.0, [8.0]))   # waits and is scored in one batch
    s.release()
    batches.append(s.drain())
    assert ("waiting", b"r2") not in batches[1].writes and batches[1].writes[("waiting", b"r1")].value is None
    assert replay_changelog(batches, UserScorer.tables) == s.stores


def test_scorer_dead_letters_a_malformed_joined_record():
    s = scorer()
    bad_context = orjson.loads(joined_record("r1", 9, 100.0, [4.0]))
    bad_context["context"]["short"] = {"item_id": ["x"], "duration_s": [1.0], "play_time_s": [1.0], "flags": [0]}
    no_context = orjson.loads(joined_record("r2", 9, 100.0, [4.0]))
    del no_context["context"]
    for raw in (orjson.dumps(bad_context), orjson.dumps(no_context), b"[1, 2]", b"{not json"):
        s.on_joined(0, b"9", raw)
    letters = [schemas.decode_dead_letter(o.value) for o in s.drain().outputs]
    reasons = [letter["reason"] for letter in letters]
    assert len(reasons) == 4 and s.stats.dead_letters == 4, reasons
    assert "context.short.item_id[0]" in reasons[0] and "context" in reasons[1] and "object" in reasons[2]
    assert s.stores["waiting"] == {}


def test_default_partition_is_kafkas():
    from aiokafka.partitioner import DefaultPartitioner

    from streaming.app import default_partition

    for n in (1, 2, 3, 8):
        for key in (b"", b"r1", b"kr-123-4", b"\x00watermark", "9".encode()):
            assert default_partition(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))
