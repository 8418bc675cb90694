"""The one-stage join's state machine without a broker (streaming/join.py), and its Faust agents
under Faust's `test_context`."""
from __future__ import annotations

import asyncio
import copy

import numpy as np
import orjson

from streaming import schemas
from streaming.config import StreamConfig
from streaming.history import history_rows
from streaming.join import TABLES, UserJoin, request_key, user_key
from streaming.partitioner import default_partition

EMPTY = {"item_id": [], "duration_s": [], "play_time_s": [], "flags": []}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def imp(rid, user, ts, items=(1, 2), durations=None, **members):
    durations = durations or [10.0] * len(items)
    return schemas.encode_impression({
        "request_id": rid, "user_id": user, "ts": ts, "model_version": 1, "source": "legacy",
        "context": {"profile": [1], "short": EMPTY, "long": EMPTY},
        "items": [{"item_id": i, "semantic_id": None, "duration_s": d, "logprob": None}
                  for i, d in zip(items, durations)], **members})


def fb(rid, user, item, ts, play=5.0):
    return schemas.encode_feedback({"request_id": rid, "user_id": user, "item_id": item, "ts": ts,
                                    "play_time_s": play, "dislike": False})


def home(user, partitions=2):
    return default_partition(user_key(user), partitions)


def joiner(clock=None, **cfg):
    cfg = StreamConfig(**{"feedback_window_s": 30.0, "idle_close_s": 5.0, "partitions": 2, **cfg})
    return UserJoin(cfg, {t: {} for t in TABLES}, wall_clock=clock or Clock())


def send(j, kind, raw):
    """One event, keyed and placed as a producer of layout 2 would."""
    user = orjson.loads(raw)["user_id"]
    j.on_message(kind, home(user, j.cfg.partitions), user_key(user), raw)


def samples_of(batch):
    return [schemas.decode_sample(o.value) for o in batch.outputs if o.kind == "samples"]


def requests_of(batch):
    return sorted({s["request_id"] for s in samples_of(batch)})


def test_feedback_before_impression_joins_and_window_closes_on_watermark():
    j = joiner()
    send(j, "feedback", fb("a", 1, 2, 101.0))
    send(j, "impressions", imp("a", 1, 100.0))
    j.close_due()
    assert samples_of(j.drain()) == []            # watermark 100..101 < 130
    send(j, "impressions", imp("b", 1, 131.0))
    send(j, "feedback", fb("b", 1, 1, 131.5))
    j.close_due()
    out = samples_of(j.drain())
    assert [(s["request_id"], s["item_id"]) for s in out] == [("a", 1), ("a", 2)]
    assert out[0]["feedback"] is None and out[1]["feedback"]["ts"] == 101.0 and out[1]["q"] == 0.5


def test_a_lagging_input_holds_the_watermark():
    """Impressions read far ahead of feedback must not close windows whose feedback is unread."""
    j = joiner()
    send(j, "impressions", imp("a", 1, 100.0))
    send(j, "feedback", fb("x", 1, 1, 100.5))          # feedback input at 100.5
    send(j, "impressions", imp("b", 1, 500.0))        # impressions input at 500
    j.close_due()
    assert samples_of(j.drain()) == []
    send(j, "feedback", fb("a", 1, 1, 102.0))
    send(j, "feedback", fb("b", 1, 1, 501.0))
    j.close_due()
    out = samples_of(j.drain())
    assert requests_of_list(out) == ["a"] and out[0]["feedback"] is not None


def requests_of_list(samples):
    return sorted({s["request_id"] for s in samples})


def test_idle_partition_closes_on_wall_clock():
    clock = Clock()
    j = joiner(clock)
    send(j, "impressions", imp("a", 1, 100.0))
    send(j, "feedback", fb("a", 1, 1, 101.0))
    j.close_due()
    assert samples_of(j.drain()) == []
    clock.t += 6.0                                 # > idle_close_s: both inputs idle
    j.on_message("ticks", home(1), b"tick", b"0")
    j.close_due()
    assert requests_of(j.drain()) == ["a"]


def test_replaying_a_batch_against_the_old_state_gives_the_same_outputs():
    """A crash after the outputs but before the changelog: the batch runs again on the old state."""
    j = joiner()
    first = [("impressions", imp("a", 1, 100.0)), ("feedback", fb("a", 1, 1, 101.0))]
    for kind, raw in first:
        send(j, kind, raw)
    j.close_due()
    j.drain()
    before = copy.deepcopy(j.stores)
    second = [("impressions", imp("b", 1, 140.0)), ("feedback", fb("b", 1, 2, 141.0))]
    for kind, raw in second:
        send(j, kind, raw)
    j.close_due()
    outputs = [(o.kind, o.partition, o.key, o.value) for o in j.drain().outputs]
    assert requests_of_list([schemas.decode_sample(v) for k, _, _, v in outputs if k == "samples"]) == ["a"]

    again = joiner()
    for name, store in before.items():
        again.stores[name].update(store)
    for kind, raw in first[1:] + second:      # redelivered from the last committed offset
        send(again, kind, raw)
    again.close_due()
    assert [(o.kind, o.partition, o.key, o.value) for o in again.drain().outputs] == outputs
    # and once the state is committed, the same inputs once more produce nothing new
    for kind, raw in second:
        send(j, kind, raw)
    j.close_due()
    assert j.drain().outputs == []


def scores(batch):
    return {(s["request_id"], s["item_id"]): s["q"] for s in samples_of(batch)}


def test_q_is_scored_against_the_users_earlier_plays_and_the_history_is_bounded():
    """Same bucket (10 s): r1 has no history -> 0.5; r2: {4} -> 8: 1.0, 2: 0.0; r3: {4, 8, 2} -> 5: 2/3."""
    j = joiner(history_len=3)
    for rid, ts, plays in (("r1", 100.0, [4.0]), ("r2", 200.0, [8.0, 2.0]), ("r3", 300.0, [5.0, None])):
        send(j, "impressions", imp(rid, 9, ts, items=tuple(range(len(plays)))))
        for i, p in enumerate(plays):
            if p is not None:
                send(j, "feedback", fb(rid, 9, i, ts + 1, p))
    send(j, "impressions", imp("z", 9, 1000.0))
    send(j, "feedback", fb("z", 9, 1, 1000.0))
    j.close_due()
    batch = j.drain()
    assert scores(batch) == {("r1", 0): 0.5, ("r2", 0): 1.0, ("r2", 1): 0.0, ("r3", 0): 2 / 3, ("r3", 1): None}
    assert {o.key for o in batch.outputs} == {b"9"} and {o.partition for o in batch.outputs} == {home(9)}
    assert history_rows(j.stores["users"][b"9"])[:, 1].tolist() == [8.0, 2.0, 5.0]   # bounded, newest kept


def test_a_request_scored_after_a_later_one_enters_the_history_in_ts_order():
    """An impression that arrives after its window closed (late data) is scored at the next close: its plays
    go into the user's history by ts, and only plays of earlier requests count."""
    j = joiner(history_len=10)
    send(j, "impressions", imp("r200", 9, 200.0, items=(0,)))
    send(j, "feedback", fb("r200", 9, 0, 201.0, 8.0))
    send(j, "impressions", imp("zz", 9, 400.0))
    send(j, "feedback", fb("zz", 9, 1, 400.0))
    j.close_due()
    got = scores(j.drain())
    send(j, "impressions", imp("r100", 9, 100.0, items=(0,)))   # late: its window has passed
    send(j, "feedback", fb("r100", 9, 0, 101.0, 2.0))
    j.close_due()
    got.update(scores(j.drain()))
    send(j, "impressions", imp("r150", 9, 150.0, items=(0, 1)))
    send(j, "feedback", fb("r150", 9, 0, 151.0, 3.0))
    send(j, "feedback", fb("r150", 9, 1, 151.0, 1.0))
    j.close_due()
    got.update(scores(j.drain()))
    assert got == {("r200", 0): 0.5, ("r100", 0): 0.5, ("r150", 0): 1.0, ("r150", 1): 0.0}
    assert history_rows(j.stores["users"][b"9"])[:, 2].tolist() == [100.0, 150.0, 150.0, 200.0]


def test_events_with_a_wrong_key_or_on_a_wrong_partition_are_dead_letters():
    j = joiner()
    user, other = 1, next(u for u in range(2, 50) if home(u) != home(1))
    j.on_message("impressions", home(user), user_key(other), imp("a", user, 100.0))     # another user's key
    j.on_message("feedback", home(user), b"r-a", fb("a", user, 1, 101.0))               # a request id as key
    j.on_message("feedback", 1 - home(user), user_key(user), fb("a", user, 1, 101.0))   # the wrong partition
    j.on_message("impressions", home(user), None, imp("b", user, 100.0))                 # no key
    letters = [schemas.decode_dead_letter(o.value) for o in j.drain().outputs]
    reasons = [d["reason"] for d in letters]
    assert len(reasons) == 4 and j.stats.dead_letters == 4, reasons
    assert all("does not match user_id 1" in r for r in reasons[:2] + reasons[3:]), reasons
    assert f"arrived on partition {1 - home(user)}" in reasons[2] and "murmur2" in reasons[2]
    assert schemas.dead_letter_original(letters[0]) == imp("a", user, 100.0)
    assert j.stores["impressions"] == {} and j.max_ts == {}   # none of them counted


def test_a_new_users_malformed_context_is_a_dead_letter_naming_the_field():
    """The join reads a context only to start a new user's history (at the request's close): a bad one then
    makes the request a dead letter; a context that is no object at all is refused on arrival."""
    j = joiner()
    bad = orjson.loads(imp("a", 1, 100.0))
    bad["context"]["short"] = {"item_id": ["x"], "duration_s": [1.0], "play_time_s": [1.0], "flags": [0]}
    send(j, "impressions", orjson.dumps(bad))
    send(j, "impressions", orjson.dumps(dict(bad, request_id="b", context=[1])))
    send(j, "impressions", imp("z", 1, 500.0))
    send(j, "feedback", fb("z", 1, 1, 500.0))
    j.close_due()
    batch = j.drain()
    letters = [schemas.decode_dead_letter(o.value) for o in batch.outputs if o.kind == "dead-letters"]
    reasons = [d["reason"] for d in letters]
    assert len(reasons) == 2 and "context must be an object" in reasons[0], reasons
    assert "context.short.item_id[0]" in reasons[1] and letters[1]["topic"] == "impressions"
    assert orjson.loads(schemas.dead_letter_original(letters[1])) == dict(bad, arm=None)
    assert samples_of(batch) == [] and "users" not in {w.table for w in batch.writes.values()}


def test_samples_carry_the_arm_and_the_impressions_own_members():
    j = joiner()
    send(j, "impressions", imp("a", 1, 100.0, arm="treatment"))
    send(j, "impressions", imp("b", 1, 101.0, note="kept", q="the join's q wins"))
    send(j, "impressions", imp("c", 1, 102.0))
    send(j, "impressions", imp("z", 1, 500.0))
    send(j, "feedback", fb("z", 1, 1, 500.0))
    j.close_due()
    by_request = {s["request_id"]: s for s in samples_of(j.drain())}
    assert by_request["a"]["arm"] == "treatment" and by_request["c"]["arm"] is None
    assert by_request["b"]["note"] == "kept" and by_request["b"]["q"] is None and by_request["b"]["arm"] is None


def test_agents_under_faust_test_context():
    from streaming.app import JoinWorker

    async def run():
        worker = JoinWorker(StreamConfig(namespace="unit", batch_within_s=0.01, idle_close_s=5.0))
        worker.app.finalize()
        worker.app.flow_control.resume()
        produced, changelog = [], []

        async def outputs(records):
            produced.extend(records)

        async def writes(records):
            changelog.extend(records)

        worker.send_outputs, worker.send_changelog = outputs, writes   # the Sink, captured instead of produced
        p = home(3)
        async with worker.app.agents["join_impressions"].test_context() as imps, \
                worker.app.agents["join_feedback"].test_context() as fbs:
            await imps.put(imp("r1", 3, 100.0, items=(0, 1)), key=b"3", partition=p)
            await fbs.put(fb("r1", 3, 0, 101.0, 4.0), key=b"3", partition=p)
            await asyncio.sleep(0.05)
            assert produced == []
            await imps.put(imp("r2", 3, 200.0), key=b"3", partition=p)
            await fbs.put(fb("r2", 3, 1, 201.0), key=b"3", partition=p)
            for _ in range(50):
                if produced:
                    break
                await asyncio.sleep(0.02)
        consumer = worker.app._consumer   # created by the stream; its (never started) thread made a loop
        if consumer is not None:
            consumer._thread.thread_loop.close()
        samples = [schemas.decode_sample(o.value) for o in produced]
        assert [(s["request_id"], s["item_id"], s["q"]) for s in samples] == [("r1", 0, 0.5), ("r1", 1, None)]
        assert {w.table for w in changelog} >= {"impressions", "users", "closed"}

    loop = asyncio.new_event_loop()   # Faust's services bind to the loop current at creation
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def replay_changelog(batches):
    """The stores a restart restores: every batch's writes applied in order to empty tables."""
    stores = {t: {} for t in TABLES}
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
    for kind, raw in [("impressions", imp("a", 1, 100.0)), ("feedback", fb("a", 1, 1, 101.0)),
                      ("impressions", imp("b", 1, 120.0)), ("feedback", fb("b", 1, 2, 121.0)),
                      ("impressions", imp("c", 1, 140.0)), ("feedback", fb("c", 1, 1, 141.0))]:
        send(j, kind, raw)
    j.close_due()
    batches.append(j.drain())
    slots = {(w.table, w.key, w.value is None) for w in batches[0].writes.values()}
    a, b = request_key(home(1), "a"), request_key(home(1), "b")
    assert ("impressions", a, True) not in slots and ("feedback", a, True) not in slots  # never written
    assert {("closed", a, False), ("impressions", b, False), ("users", b"1", False)} <= slots
    assert replay_changelog(batches) == j.stores
    # batch 2: "b" closes now: its earlier records need tombstones
    send(j, "impressions", imp("d", 1, 200.0))
    send(j, "feedback", fb("d", 1, 1, 200.5))
    j.close_due()
    batches.append(j.drain())
    slots = {(w.table, w.key, w.value is None) for w in batches[1].writes.values()}
    assert {("impressions", b, True), ("feedback", b, True), ("closed", b, False)} <= slots
    assert replay_changelog(batches) == j.stores


def test_default_partition_is_kafkas():
    from aiokafka.partitioner import DefaultPartitioner

    for n in (1, 2, 3, 8):
        for key in (b"", b"r1", b"kr-123-4", b"\x00watermark", "9".encode()):
            assert default_partition(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))


def test_batched_partitioner_matches_the_reference_key_by_key():
    from streaming.partitioner import default_partitions

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
    impressions, impressions with extra fields, and events with a wrong key or partition."""
    import random

    rng = random.Random(seed)
    events = []   # (arrival ts, kind, partition, key, raw)
    ts = 1000.0

    def keyed(user):
        key = user_key(user)
        if rng.random() < 0.02:
            return (1 - home(user)), key          # the wrong partition
        if rng.random() < 0.02:
            return home(user), b"not-the-user"   # the wrong key
        return home(user), key

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
        if rng.random() < 0.1:
            event["arm"] = rng.choice(["a", "b"])
        if rng.random() < 0.05:
            event["feedback"] = {"an impression's own field": "the join's feedback replaces it"}
        raw_imp = orjson.dumps(event)
        arrival = ts + (rng.uniform(0, 8) if rng.random() < 0.2 else 0.0)   # some impressions come late
        if rng.random() < 0.05:
            continue   # never served: its feedback is orphaned
        events.append((arrival, "impressions", *keyed(user), raw_imp))
        if rng.random() < 0.1:
            events.append((arrival + rng.uniform(0, 50), "impressions", *keyed(user), raw_imp))
        for item in items + ([99] if rng.random() < 0.05 else []):
            if rng.random() < 0.3:
                continue
            fb_ts = ts + rng.uniform(0.1, 40)   # > 30 s: late
            fb_user = user if rng.random() > 0.05 else user + 1
            raw_fb = fb(rid, fb_user, item, fb_ts, play=round(rng.uniform(0, 60), 1))
            events.append((fb_ts + (rng.uniform(-5, 0) if rng.random() < 0.2 else 0), "feedback", *keyed(fb_user),
                           raw_fb))
            if rng.random() < 0.1:
                events.append((fb_ts + rng.uniform(0, 60), "feedback", *keyed(fb_user), raw_fb))
    events.sort(key=lambda e: e[0])
    return [e[1:] for e in events]


def run_stream(events, batch: int, *, restart_every_batch: bool):
    """The join, batch by batch as the worker drives it; with `restart_every_batch`, a fresh state machine
    restored from the changelog alone (plus the watermarks a worker would have read again)."""
    cfg = StreamConfig(feedback_window_s=30.0, idle_close_s=5.0, partitions=2, history_len=4,
                       closed_retention_s=60.0)
    clock = Clock()
    join = UserJoin(cfg, {t: {} for t in TABLES}, wall_clock=clock)
    changelog, outputs = [], []
    for start in range(0, len(events) + batch, batch):
        chunk = events[start:start + batch]
        if start >= len(events):
            clock.t += 10.0   # the end: every input idle, every window closes
            chunk = [("ticks", p, b"tick", b"0") for p in range(2)]
        for kind, partition, key, raw in chunk:
            join.on_message(kind, partition, key, raw)
        join.close_due()
        drained = join.drain()
        changelog.append(drained)
        outputs.append([(o.kind, o.partition, o.key, o.value) for o in drained.outputs])
        if restart_every_batch:
            old = join
            join = UserJoin(cfg, replay_changelog(changelog), wall_clock=clock)
            for name in ("max_ts", "last_wall", "first_wall"):
                setattr(join, name, dict(getattr(old, name)))
            join.rebuild_deadlines()
    assert replay_changelog(changelog) == join.stores
    return outputs, join


def test_state_restored_from_the_changelog_after_every_batch_gives_the_same_outputs():
    events = scenario(1)
    for batch in (1, 7, 40, len(events)):
        outputs, join = run_stream(events, batch, restart_every_batch=False)
        restored, _ = run_stream(events, batch, restart_every_batch=True)
        assert restored == outputs, batch          # the same records, byte for byte, batch by batch
        kinds = [kind for out in outputs for kind, *_ in out]
        assert kinds.count("samples") > 50 and kinds.count("dead-letters") > 5
        assert join.stores["impressions"] == join.stores["feedback"] == {}
        assert join.stats.duplicates > 0 and join.stats.samples == kinds.count("samples")


def test_samples_do_not_depend_on_how_the_stream_is_cut_into_batches():
    """Requests that open and close within one batch never touch the stores; the same requests spread over
    many batches go through them: the samples must be the same bytes."""
    events = scenario(2)
    by_batch = {}
    for batch in (1, 5, len(events)):
        outputs, _ = run_stream(events, batch, restart_every_batch=False)
        by_batch[batch] = sorted(out for batch_out in outputs for out in batch_out if out[0] != "dead-letters")
    assert by_batch[1] == by_batch[5] == by_batch[len(events)]
    samples = [schemas.decode_sample(value) for _, _, _, value in by_batch[1]]
    assert any("note" in s for s in samples) and any(s["arm"] for s in samples)
    assert any(s["feedback"] for s in samples)
    assert all(s["feedback"] is None or s["feedback"]["user_id"] == s["user_id"] for s in samples)


def test_a_partition_seen_mid_batch_keeps_the_batchs_open_requests():
    j = joiner()
    u0, u1 = next(u for u in range(50) if home(u) == 0), next(u for u in range(50) if home(u) == 1)
    send(j, "impressions", imp("a", u0, 100.0))
    send(j, "feedback", fb("a", u0, 1, 101.0))
    send(j, "impressions", imp("b", u1, 100.5))   # partition 1 is new: heaps rebuilt from the stores
    send(j, "feedback", fb("b", u1, 2, 102.0))
    for u in (u0, u1):
        send(j, "impressions", imp(f"z{u}", u, 200.0))
        send(j, "feedback", fb(f"z{u}", u, 1, 200.5))
    j.close_due()
    out = samples_of(j.drain())
    assert requests_of_list(out) == ["a", "b"]
    assert [(s["request_id"], s["item_id"]) for s in out if s["feedback"]] == [("a", 1), ("b", 2)]


def test_feedback_for_another_partitions_request_id_stays_apart_from_it():
    """A wrong user's feedback on another partition is an orphan there, whether or not one worker holds
    both partitions (the request's state is keyed by partition too)."""
    j = joiner()
    other = next(u for u in range(1, 50) if home(u) != home(0))
    send(j, "impressions", imp("r", 0, 100.0))
    send(j, "feedback", fb("r", other, 1, 101.0))
    send(j, "feedback", fb("r", 0, 1, 102.0, play=7.0))
    for user in (0, other):
        send(j, "impressions", imp(f"z{user}", user, 300.0))
        send(j, "feedback", fb(f"z{user}", user, 1, 300.0))
    j.close_due()
    batch = j.drain()
    reasons = [schemas.decode_dead_letter(o.value)["reason"] for o in batch.outputs if o.kind == "dead-letters"]
    assert reasons == [f"no impression for request_id 'r' of user_id {other} within the feedback window"]
    assert [s["feedback"]["play_time_s"] for s in samples_of(batch) if s["request_id"] == "r" and s["feedback"]] == [7.0]
