"""The join's state machines without a broker (streaming/join.py), and the scoring agent under
Faust's `test_context`."""
from __future__ import annotations

import asyncio
import copy

import numpy as np
import orjson

from streaming import schemas
from streaming.config import StreamConfig
from streaming.join import (WATERMARK_KEY, RequestJoiner, UserScorer, decode_joined, decode_user, encode_joined,
                            history_rows, recent_hashes, request_hash, watermark_heartbeat)

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
    return [decode_joined(o.value) for o in batch.outputs if o.kind == "joined"]


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
    assert [decode_joined(v)["request_id"] for k, _, v in outputs if k == "joined"] == ["a"]

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
    return encode_joined(record)


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
    recent, history = decode_user(shuffled.stores["users"][b"9"])
    assert recent_hashes(recent) == [request_hash(r) for r in ("r1", "r2", "r3")]
    assert history_rows(history)[:, 1].tolist() == [8.0, 2.0, 5.0]   # bounded, newest kept
    shuffled.on_joined(0, b"9", records[0])        # a redelivered request is dropped
    shuffled.release()
    assert scores(shuffled) == {} and shuffled.stats.duplicates == 1


def test_a_source_that_resumes_after_idling_is_waited_for_again():
    """An idle source's mark (MAX_MARK) releases everything; once it has events again its finite mark
    holds back later requests until it has closed the earlier ones (the latest mark counts, not the largest)."""
    s = scorer()
    for src in range(2):
        s.on_joined(0, WATERMARK_KEY, watermark_heartbeat(src, 1e18))   # both sources idle
    s.on_joined(0, b"9", joined_record("a", 9, 100.0, [4.0]))
    s.release()
    assert scores(s) == {("a", 0): 0.5}
    s.on_joined(0, WATERMARK_KEY, watermark_heartbeat(1, 150.0))      # source 1 resumes, behind
    s.on_joined(0, b"9", joined_record("c", 9, 300.0, [5.0]))          # from source 0 (still idle)
    s.release()
    assert scores(s) == {}, "c must wait: source 1 may still close a request before ts 300"
    s.on_joined(0, b"9", joined_record("b", 9, 200.0, [8.0]))          # source 1's request closes
    s.on_joined(0, WATERMARK_KEY, watermark_heartbeat(1, 400.0))
    s.release()
    assert scores(s) == {("b", 0): 1.0, ("c", 0): 0.5}                 # c is scored against {4, 8}


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
    bad_context = decode_joined(joined_record("r1", 9, 100.0, [4.0]))
    bad_context["context"]["short"] = {"item_id": ["x"], "duration_s": [1.0], "play_time_s": [1.0], "flags": [0]}
    no_context = decode_joined(joined_record("r2", 9, 100.0, [4.0]))
    no_context_line = joined_record("r2", 9, 100.0, [4.0]).split(b"\n")[0]
    for raw in (encode_joined(bad_context), no_context_line, b"[1, 2]", b"{not json"):
        s.on_joined(0, b"9", raw)
    letters = [schemas.decode_dead_letter(o.value) for o in s.drain().outputs]
    reasons = [letter["reason"] for letter in letters]
    assert len(reasons) == 4 and s.stats.dead_letters == 4, reasons
    assert "context.short.item_id[0]" in reasons[0] and "context" in reasons[1] and "object" in reasons[2]
    assert s.stores["waiting"] == {}


def test_default_partition_is_kafkas():
    from aiokafka.partitioner import DefaultPartitioner

    from streaming.partitioner import default_partition

    for n in (1, 2, 3, 8):
        for key in (b"", b"r1", b"kr-123-4", b"\x00watermark", "9".encode()):
            assert default_partition(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))


def test_batched_partitioner_matches_the_reference_key_by_key():
    from streaming.partitioner import default_partition, default_partitions

    rng = np.random.default_rng(3)
    # every length class of the hash (whole words, 1-3 tail bytes), repeated lengths, bytes >= 0x80
    keys = [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 41, size=3000)]
    keys += [b"", b"r1", b"kr-123-4", b"\x00watermark", b"\xff" * 7] + [f"user-{i}".encode() for i in range(200)]
    for n in (1, 2, 3, 8, 61):
        assert default_partitions(keys, n) == [default_partition(k, n) for k in keys], n
    assert default_partitions([], 4) == []


# --- this batch's state waits decoded in memory and reaches the stores at drain(): the stores, the
#     changelog and the outputs must be the same as if every change had been stored at once

def scenario(seed: int, n_requests: int = 80):
    """(kind, partition, key, raw) in arrival order: a few users' impressions and feedback, with feedback
    before its impression, late, duplicated, wrong-user, unknown-item and orphan feedback, redelivered
    impressions, and impressions with extra fields."""
    import random

    rng = random.Random(seed)
    events = []   # (arrival ts, kind, partition, key, raw)
    ts = 1000.0
    for r in range(n_requests):
        ts += rng.uniform(0, 12)
        rid, user = f"s{seed}-{r}", rng.randrange(5)
        items = rng.sample(range(30), rng.randint(1, 3))
        event = {"request_id": rid, "user_id": user, "ts": ts, "model_version": 1, "source": "legacy",
                 "context": {"profile": [user, 1], "long": EMPTY,
                             "short": {"item_id": [7, 8], "duration_s": [rng.uniform(1, 60), 9.0],
                                       "play_time_s": [rng.uniform(0, 60), 1], "flags": [0, 64]}},
                 "items": [{"item_id": i, "semantic_id": None, "duration_s": rng.choice([5.0, 10.0, 33.3, 70.0]),
                            "logprob": None} for i in items]}
        if rng.random() < 0.1:
            event["note"] = "extra fields pass through"
        if rng.random() < 0.05:
            event["feedback"] = {"an impression's own field": "the join's feedback replaces it"}
        raw_imp = orjson.dumps(event)
        partition = r % 2
        arrival = ts + (rng.uniform(0, 8) if rng.random() < 0.2 else 0.0)   # some impressions come late
        if rng.random() < 0.05:
            continue   # never served: its feedback is orphaned
        events.append((arrival, "impressions", partition, rid.encode(), raw_imp))
        if rng.random() < 0.1:
            events.append((arrival + rng.uniform(0, 50), "impressions", partition, rid.encode(), raw_imp))
        for item in items + ([99] if rng.random() < 0.05 else []):
            if rng.random() < 0.3:
                continue
            fb_ts = ts + rng.uniform(0.1, 40)   # > 30 s: late
            fb_user = user if rng.random() > 0.05 else user + 1
            raw_fb = fb(rid, fb_user, item, fb_ts, play=round(rng.uniform(0, 60), 1))
            events.append((fb_ts + (rng.uniform(-5, 0) if rng.random() < 0.2 else 0), "feedback", partition,
                           rid.encode(), raw_fb))
            if rng.random() < 0.1:
                events.append((fb_ts + rng.uniform(0, 60), "feedback", partition, rid.encode(), raw_fb))
    events.sort(key=lambda e: e[0])
    return [e[1:] for e in events]


def run_stream(events, batch: int, *, restart_every_batch: bool):
    """Both stages, batch by batch as the worker drives them; with `restart_every_batch`, fresh state
    machines restored from the changelog alone (plus the watermarks a worker would have read again)."""
    cfg = StreamConfig(feedback_window_s=30.0, idle_close_s=5.0, partitions=2, history_len=4, dedupe_requests=3,
                       closed_retention_s=60.0)
    clock = Clock()
    joiner = RequestJoiner(cfg, {t: {} for t in RequestJoiner.tables}, wall_clock=clock)
    scorer = UserScorer(cfg, {t: {} for t in UserScorer.tables}, wall_clock=clock)
    changelog1, changelog2, outputs = [], [], []
    for start in range(0, len(events) + batch, batch):
        chunk = events[start:start + batch]
        if start >= len(events):
            clock.t += 10.0   # the end: every input idle, every window closes
            chunk = [("ticks", p, b"tick", b"0") for p in range(2)]
        for kind, partition, key, raw in chunk:
            joiner.on_message(kind, partition, key, raw)
        joiner.close_due()
        b1 = joiner.drain()
        for out in b1.outputs:
            if out.kind == "joined":
                scorer.on_joined(int(out.key) % 2, out.key, out.value)
        for src, mark in b1.closed_through.items():
            for p in range(2):
                scorer.on_joined(p, WATERMARK_KEY, watermark_heartbeat(src, mark))
        scorer.release()
        b2 = scorer.drain()
        changelog1.append(b1)
        changelog2.append(b2)
        # (the order across stage-2 partitions follows the order of their heaps; only each partition's is kept)
        outputs.append(sorted((o.kind, o.key, o.value) for o in b1.outputs + b2.outputs))
        if restart_every_batch:
            old_joiner, old_scorer = joiner, scorer
            joiner = RequestJoiner(cfg, replay_changelog(changelog1, RequestJoiner.tables), wall_clock=clock)
            scorer = UserScorer(cfg, replay_changelog(changelog2, UserScorer.tables), wall_clock=clock)
            for name in ("max_ts", "last_wall", "first_wall"):
                setattr(joiner, name, dict(getattr(old_joiner, name)))
            joiner.rebuild_deadlines()
            scorer.closed_through = dict(old_scorer.closed_through)
            scorer._seen_partitions = set(old_scorer._seen_partitions)
            scorer.rebuild_waiting()
    assert replay_changelog(changelog1, RequestJoiner.tables) == joiner.stores
    assert replay_changelog(changelog2, UserScorer.tables) == scorer.stores
    return outputs, joiner, scorer


def test_state_restored_from_the_changelog_after_every_batch_gives_the_same_outputs():
    events = scenario(1)
    for batch in (1, 7, 40, len(events)):
        outputs, joiner, scorer = run_stream(events, batch, restart_every_batch=False)
        restored, _, _ = run_stream(events, batch, restart_every_batch=True)
        assert restored == outputs, batch          # the same records, byte for byte, batch by batch
        kinds = [kind for out in outputs for kind, _, _ in out]
        assert kinds.count("samples") > 50 and kinds.count("dead-letters") > 5
        assert joiner.stores["impressions"] == joiner.stores["feedback"] == {} and scorer.stores["waiting"] == {}
        assert joiner.stats.duplicates > 0 and scorer.stats.samples == kinds.count("samples")


def test_samples_do_not_depend_on_how_the_stream_is_cut_into_batches():
    """Requests that open and close within one batch never touch the stores; the same requests spread over
    many batches go through them: the joined records and samples must be the same bytes."""
    events = [e for e in scenario(2) if e[1] == "impressions" or orjson.loads(e[3])["user_id"] < 5]
    by_batch = {}
    for batch in (1, 5, len(events)):
        outputs, _, _ = run_stream(events, batch, restart_every_batch=False)
        by_batch[batch] = sorted((kind, key, value) for out in outputs for kind, key, value in out
                                 if kind != "dead-letters")
    assert by_batch[1] == by_batch[5] == by_batch[len(events)]
    joined = [decode_joined(value) for kind, _, value in by_batch[1] if kind == "joined"]
    assert any("note" in j for j in joined) and all(isinstance(j["feedback"], dict) for j in joined)
    assert any(j["feedback"] for j in joined)


def test_a_partition_seen_mid_batch_keeps_the_batchs_open_requests():
    j = joiner()
    j.on_message("impressions", 0, b"a", imp("a", 1, 100.0))
    j.on_message("feedback", 0, b"a", fb("a", 1, 1, 101.0))
    j.on_message("impressions", 1, b"b", imp("b", 2, 100.5))   # partition 1 is new: heaps rebuilt from the stores
    j.on_message("feedback", 1, b"b", fb("b", 2, 2, 102.0))
    for p in (0, 1):
        j.on_message("impressions", p, b"z%d" % p, imp("z%d" % p, 3, 200.0))
        j.on_message("feedback", p, b"z%d" % p, fb("z%d" % p, 3, 1, 200.5))
    j.close_due()
    out = joined_of(j.drain())
    assert sorted(r["request_id"] for r in out) == ["a", "b"]
    assert [set(r["feedback"]) for r in sorted(out, key=lambda r: r["request_id"])] == [{"1"}, {"2"}]


def test_a_request_scored_after_a_later_one_enters_the_history_in_ts_order():
    """A request can reach stage 2 after its window was declared closed (a stage-1 restart that lost its
    watermarks): its plays go into the user's history by ts, and only plays of earlier requests count."""
    s = scorer(history_len=10)
    for src in range(2):
        s.on_joined(0, WATERMARK_KEY, watermark_heartbeat(src, 1e18))
    s.on_joined(0, b"9", joined_record("r200", 9, 200.0, [8.0]))
    s.release()
    s.on_joined(0, b"9", joined_record("r100", 9, 100.0, [2.0]))   # late
    s.release()
    s.on_joined(0, b"9", joined_record("r150", 9, 150.0, [3.0, 1.0]))
    s.release()
    assert scores(s) == {("r200", 0): 0.5, ("r100", 0): 0.5, ("r150", 0): 1.0, ("r150", 1): 0.0}
    _, history = decode_user(s.stores["users"][b"9"])
    assert history_rows(history)[:, 2].tolist() == [100.0, 150.0, 150.0, 200.0]


def test_a_request_hash_matches_only_on_its_own_slot():
    from streaming.join import _has_hash

    a, b = request_hash("a"), request_hash("b")
    recent = a + b
    assert _has_hash(recent, a) and _has_hash(recent, b) and not _has_hash(recent, request_hash("c"))
    assert not _has_hash(recent, recent[4:12])      # 8 bytes that straddle two hashes are not a hash
    assert not _has_hash(b"", a)
