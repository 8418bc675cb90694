"""The join as one plain state machine per worker: impressions + feedback -> samples with q. The
workers (streaming/batch_worker.py, and streaming/app.py under Faust) drive it batch by batch.

Invariant (at-least-once, idempotent): for every impression, exactly one sample per shown item reaches
the samples topic at least once, and every copy of it is identical; redeliveries, duplicated events
and restarts produce at most repeated copies (same key, same `(request_id, item_id)`, same content),
never a lost or a different sample. This holds because each batch is committed in three ordered
steps (streaming/commit.py): (1) outputs are produced and acknowledged, (2) only then the state
changes go to the changelog, (3) only then the input offsets are committed. A crash between (1) and
(3) replays the batch against the old state and re-emits the same outputs.

One stage, keyed by user: impressions and feedback are keyed by `user_id` (the decimal id as ASCII
bytes, partitioned by Kafka's murmur2), so a user's requests, their feedback and the user's play
history all live on one partition. Per partition the join holds the open requests with their
feedback (stores `impressions`, `feedback`, keyed by request_id), the markers of closed requests
(`closed`) and per user the bounded play history (`users`, streaming/history.py). A request's window closes when the partition's watermark (the smaller of the
largest ts read from impressions and from feedback, an input idle for `idle_close` wall seconds left
out) passes `impression.ts + feedback_window_s`; windows close in ts order, so the request is scored
right then against the user's earlier plays, and one sample per shown item goes out (keyed by
user_id, to the same partition number of `samples`).

Rules: an event whose key is not its user id, or that sits on another partition than its key's, is a
dead letter with that reason. Feedback joins iff it names a shown item of the same user,
`ts <= impression.ts + window`, and arrives before the window closes; repeated feedback for an item
keeps the one with the largest ts (an identical repeat is a duplicate); late, unknown-item,
wrong-user and never-joined (orphan) feedback become dead letters with the reason and the original
bytes. A request id seen again after it closed is a duplicate (within `closed_retention_s` of event
time: its `closed` marker says so).

Bytes, not dicts: an impression is decoded and checked once, on arrival (`fast_schemas.split_impression`),
all but its context, which must be a JSON object: the context was checked where it was produced, and
the join reads it only to start a new user's history at the request's close (a context that fails
then makes the request a dead letter, with the impression as the join kept it). It travels as the
producer's JSON bytes into every sample, the shared members as bytes encoded once. State changes are recorded as `StateWrite`s, the last one per key and batch (a key
created and deleted within one batch writes nothing). Deadline heaps are derived from the stores and
rebuilt after a restart. State a batch creates waits decoded in memory until `drain()`; the stores and
writes a batch leaves are the same as if every change had gone to a store at once. Store values:
Request entries are keyed by `request_key` (partition/request_id), user entries by `user_key`.
- `impressions`: lines `[partition, user_id, ts, [item ids]]`, the items, the shared members, the context;
- `feedback`: `{"p": partition, "fb": [feedback events as they arrived]}`;
- `closed`: `{"p", "forget_at", "fb": {item id: [ts, play_time_s]}}`; `users`: see streaming/history.py.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import orjson

from streaming import history as hist
from streaming import schemas
from streaming.config import StreamConfig
from streaming.fast_schemas import (Feedback, ImpressionParts, SampleItem, context_plays, decode_feedback,
                                    decode_items, encode, sample_bytes, sample_tail, split_impression)
from streaming.partitioner import default_partition
from streaming.schemas import SchemaError

Store = MutableMapping[bytes, bytes]
INPUTS = ("impressions", "feedback")
TABLES = ("impressions", "feedback", "closed", "users")
PARTITION_MEMO_SIZE = 1_000_000


class Output(NamedTuple):   # tuples of bytes and str: the garbage collector soon stops tracking them
    kind: str               # topic kind: "samples", "dead-letters"
    partition: int | None   # None: by the key (Kafka's default partitioner)
    key: bytes
    value: bytes


class StateWrite(NamedTuple):
    table: str           # which store
    partition: int       # changelog partition (= the input partition that owns the key)
    key: bytes
    value: bytes | None  # None = delete (tombstone)


@dataclass
class Batch:
    outputs: list[Output] = field(default_factory=list)
    writes: dict[tuple[str, bytes], StateWrite] = field(default_factory=dict)  # last write per key wins
    created: set[tuple[str, bytes]] = field(default_factory=set)  # (table, key)s absent before this batch

    def __len__(self) -> int:
        return len(self.outputs) + len(self.writes)


@dataclass
class JoinStats:
    impressions: int = 0
    feedback: int = 0
    joined_requests: int = 0
    joined_feedback: int = 0
    samples: int = 0
    duplicates: int = 0
    dead_letters: int = 0


class _FeedbackEntry(msgspec.Struct):
    p: int
    fb: list[msgspec.Raw]


_FEEDBACK_ENTRY = msgspec.json.Decoder(_FeedbackEntry)


def request_key(partition: int, request_id: str) -> bytes:
    """The key of a request's entries in the `impressions`, `feedback` and `closed` stores: its partition
    and request id (`b"0/r1"`), so that feedback naming another partition's request (a wrong user's) is
    kept apart from that request whichever partitions one worker holds."""
    return b"%d/%s" % (partition, request_id.encode())


def user_key(user_id: int) -> bytes:
    """The key of a user's impressions, feedback and samples: the decimal user id as ASCII bytes."""
    return str(user_id).encode()


class UserJoin:
    """The one-stage join (module docstring). `on_message` per input record, `close_due` once per
    batch, then `drain` hands over the batch's outputs and state writes."""

    tables = TABLES

    def __init__(self, cfg: StreamConfig, stores: dict[str, Store], *, wall_clock: Callable[[], float] = time.time):
        missing = [t for t in self.tables if t not in stores]
        if missing:
            raise ValueError(f"UserJoin needs stores {self.tables}, missing {missing}")
        self.cfg, self.stores, self.wall_clock = cfg, stores, wall_clock
        self.batch, self.stats = Batch(), JoinStats()
        self.window = float(cfg.feedback_window_s)
        self.max_ts: dict[tuple[int, str], float] = {}      # (partition, input) -> largest event ts read
        self.last_wall: dict[tuple[int, str], float] = {}   # (partition, input) -> wall time of its last event
        self.first_wall: dict[int, float] = {}              # partition -> wall time it was first seen
        self._deadlines: dict[int, list] = {}  # partition -> heap of (event ts, 0 close / 1 expire, request_id)
        self._forgets: dict[int, list] = {}    # partition -> heap of (forget_at, 2, request_id) of closed markers
        # request_id -> (meta (partition, user_id, ts, shown item ids), items, shared, context): this batch's
        self._arrived: dict[bytes, tuple[tuple, list, bytes, bytes]] = {}
        self._feedback: dict[bytes, dict] = {}   # request_id -> {"p": partition, "fb": [(Feedback, raw)]}
        self._closed: dict[bytes, tuple[int, bytes]] = {}   # request_id -> (partition, closed marker)
        self._home: dict[bytes, int] = {}        # key -> its partition (memo of the partitioner)
        self._buckets = hist.Buckets(cfg.duration_beta)

    # --- plumbing
    def _put(self, table: str, partition: int, key: bytes, value: bytes | None) -> None:
        store, batch, slot = self.stores[table], self.batch, (table, key)
        created, writes = batch.created, batch.writes
        if slot not in writes and slot not in created and key not in store:
            created.add(slot)
        if value is None:
            store.pop(key, None)
            if slot in created:   # created and deleted within this batch: the changelog never had it
                writes.pop(slot, None)
                return
        else:
            store[key] = value
        writes[slot] = StateWrite(table, partition, key, value)

    def _dead(self, *, topic: str, reason: str, original: bytes, key: bytes | None) -> None:
        letter = schemas.dead_letter(topic=topic, reason=reason, original=original, ts=self.wall_clock())
        self.batch.outputs.append(Output("dead-letters", None, key or b"", schemas.encode_dead_letter(letter)))
        self.stats.dead_letters += 1

    def drain(self) -> Batch:
        """Store this batch's open state, then hand over what the batch produced and start a new one."""
        self._store_arrived()
        batch, self.batch = self.batch, Batch()
        return batch

    # --- inputs
    def on_message(self, topic_kind: str, partition: int, key: bytes | None, raw: bytes) -> None:
        if partition not in self.first_wall:   # new to this process (start, restart, rebalance):
            self.rebuild_deadlines()           # its stores were just restored
            self.first_wall[partition] = self.wall_clock()
        if topic_kind == "ticks":
            return  # a tick only registers the partition (idle inputs close on the wall clock)
        self.last_wall[(partition, topic_kind)] = self.wall_clock()
        try:
            if topic_kind == "impressions":
                imp = split_impression(raw)
                self._check_key(partition, key, imp.user_id)
                self._on_impression(partition, imp, raw)
            elif topic_kind == "feedback":
                fb = decode_feedback(raw)
                self._check_key(partition, key, fb.user_id)
                self._on_feedback(partition, fb, raw)
            else:
                raise SchemaError(f"unexpected topic kind {topic_kind!r}")
        except SchemaError as exc:
            self._dead(topic=topic_kind, reason=exc.reason, original=raw, key=key)

    def _check_key(self, partition: int, key: bytes | None, user_id: int) -> None:
        """SchemaError unless `key` is the event's user id and `partition` is that key's partition."""
        if key != user_key(user_id):
            raise SchemaError(f"key {key!r} does not match user_id {user_id} (impressions and feedback are "
                              "keyed by the decimal user id as ASCII bytes)")
        home = self._home.get(key)
        if home is None:
            if len(self._home) > PARTITION_MEMO_SIZE:
                self._home.clear()
            home = self._home[key] = default_partition(key, self.cfg.partitions)
        if home != partition:
            raise SchemaError(f"arrived on partition {partition}, but key {key!r} belongs to partition {home} "
                              f"(Kafka's murmur2 default partitioner over {self.cfg.partitions} partitions)")

    def input_behind(self, partition: int, kind: str) -> None:
        """The reader knows records of this input wait to be read: it is not idle, whatever the wall
        clock says (a slow, backlogged or just-restored reader must not close windows early)."""
        self.last_wall[(partition, kind)] = self.wall_clock()

    def watermark(self, partition: int) -> float:
        """Event time up to which partition `partition` is complete: the smallest of the inputs'
        largest ts, leaving out an input idle for `idle_close` wall seconds; +inf when both are idle."""
        now = self.wall_clock()
        marks = []
        for kind in INPUTS:
            last = self.last_wall.get((partition, kind), self.first_wall.get(partition, now))
            if now - last < self.cfg.idle_close:
                if (partition, kind) not in self.max_ts:
                    return float("-inf")   # an input not heard from yet, and not idle yet: wait for it
                marks.append(self.max_ts[(partition, kind)])
        return min(marks) if marks else float("inf")

    def close_due(self) -> None:
        """Close (and score) every window the watermarks have passed (called once per batch)."""
        for partition in self.first_wall:
            newest = max((self.max_ts.get((partition, k), float("-inf")) for k in INPUTS))
            self._close_due(partition, self.watermark(partition), forget_before=newest)

    def _advance(self, partition: int, kind: str, ts: float) -> None:
        if ts > self.max_ts.get((partition, kind), float("-inf")):
            self.max_ts[(partition, kind)] = ts

    # --- open state: this batch's (decoded) first, then the stores'
    def _meta(self, rid: bytes):
        """(partition, user_id, ts, shown item ids) of the open impression of `rid`, or None."""
        arrived = self._arrived.get(rid)
        if arrived is not None:
            return arrived[0]
        value = self.stores["impressions"].get(rid)
        return None if value is None else orjson.loads(value[:value.index(b"\n")])

    def _feedback_entry(self, rid: bytes) -> dict | None:
        """The feedback waiting for `rid`, decoded (changing it: put it into `_feedback`), or None."""
        entry = self._feedback.get(rid)
        if entry is None:
            raw = self.stores["feedback"].get(rid)
            if raw is not None:
                stored = _FEEDBACK_ENTRY.decode(raw)
                entry = {"p": stored.p, "fb": [(decode_feedback(bytes(f)), bytes(f)) for f in stored.fb]}
        return entry

    def _take_feedback(self, partition: int, rid: bytes) -> list[tuple[Feedback, bytes]]:
        """Remove the feedback waiting for `rid`; returns its [(event, raw)]."""
        entry = self._feedback_entry(rid)
        self._feedback.pop(rid, None)
        if rid in self.stores["feedback"]:
            self._put("feedback", partition, rid, None)
        return entry["fb"] if entry is not None else []

    def _store_arrived(self) -> None:
        """Put this batch's open state into the stores (recording the changelog writes)."""
        for rid, (meta, items, shared, context) in self._arrived.items():
            self._put("impressions", meta[0], rid, b"\n".join((orjson.dumps(meta), encode(items), shared, context)))
        for rid, entry in self._feedback.items():
            if entry["fb"]:
                value = b'{"p":%d,"fb":[%s]}' % (entry["p"], b",".join(raw for _, raw in entry["fb"]))
                self._put("feedback", entry["p"], rid, value)
            elif rid in self.stores["feedback"]:
                self._put("feedback", entry["p"], rid, None)
        for rid, (partition, marker) in self._closed.items():
            self._put("closed", partition, rid, marker)
        self._arrived.clear()
        self._feedback.clear()
        self._closed.clear()

    def _on_impression(self, partition: int, imp: ImpressionParts, raw: bytes) -> None:
        self.stats.impressions += 1
        self._advance(partition, "impressions", imp.ts)
        rid = request_key(partition, imp.request_id)
        if rid in self._closed or rid in self.stores["closed"]:
            self.stats.duplicates += 1      # redelivery of a request already joined
            return
        items = encode(imp.items)
        arrived = self._arrived.get(rid)
        if arrived is not None:
            known = (encode(arrived[1]), arrived[2], arrived[3])
        else:
            stored = self.stores["impressions"].get(rid)
            known = None if stored is None else tuple(stored.split(b"\n", 3)[1:])
        if known is not None:   # the request is open: a redelivery, or a clash
            if known == (items, imp.shared, imp.context) or (
                    [orjson.loads(part) for part in known] == [orjson.loads(items), orjson.loads(imp.shared),
                                                               orjson.loads(imp.context)]):
                self.stats.duplicates += 1
                return
            self._dead(topic="impressions", reason=f"request_id {imp.request_id!r} already used by a "
                       "different impression", original=raw, key=user_key(imp.user_id))
            return
        meta = (partition, imp.user_id, imp.ts, [item.item_id for item in imp.items])
        self._arrived[rid] = (meta, imp.items, imp.shared, imp.context)
        heapq.heappush(self._deadlines.setdefault(partition, []), (imp.ts + self.window, 0, rid))
        entry = self._feedback_entry(rid)
        if entry is not None:   # feedback that arrived first: check it against the impression now
            entry["fb"] = [(f, r) for f, r in entry["fb"] if self._joinable(meta, f, r)]
            self._feedback[rid] = entry

    def _joinable(self, meta, fb: Feedback, raw: bytes) -> bool:
        """Feedback that can never join this impression (`meta`: partition, user_id, ts, shown item ids)
        becomes a dead letter here."""
        _, user_id, ts, shown = meta
        rid = fb.request_id
        if fb.user_id != user_id:
            reason = f"user_id {fb.user_id} does not match the impression's user_id {user_id}"
        elif fb.item_id not in shown:
            reason = f"item_id {fb.item_id} was not shown in request {rid!r}"
        elif fb.ts > ts + self.window:
            reason = (f"late feedback: ts {fb.ts} is after the feedback window of request {rid!r} "
                      f"(impression ts {ts} + {self.window} s)")
        else:
            return True
        self._dead(topic="feedback", reason=reason, original=raw, key=user_key(fb.user_id))
        return False

    def _on_feedback(self, partition: int, fb: Feedback, raw: bytes) -> None:
        self.stats.feedback += 1
        self._advance(partition, "feedback", fb.ts)
        rid = request_key(partition, fb.request_id)
        closed = self._closed[rid][1] if rid in self._closed else self.stores["closed"].get(rid)
        if closed is not None:
            joined = orjson.loads(closed)["fb"].get(str(fb.item_id))
            if joined is not None and joined == [fb.ts, fb.play_time_s]:
                self.stats.duplicates += 1   # the same feedback, already in a sample
            else:
                self._dead(topic="feedback", reason=f"late feedback: the window of request "
                           f"{fb.request_id!r} closed before it arrived", original=raw, key=user_key(fb.user_id))
            return
        meta = self._meta(rid)
        if meta is not None and not self._joinable(meta, fb, raw):
            return
        entry = self._feedback_entry(rid)
        orphan = meta is None and entry is None   # an orphan so far: it gets a deadline
        if entry is None:
            entry = {"p": partition, "fb": []}
        for i, (f, _) in enumerate(entry["fb"]):
            if f.item_id == fb.item_id:
                if f == fb:
                    self.stats.duplicates += 1
                    return
                if fb.ts >= f.ts:
                    entry["fb"][i] = (fb, raw)
                break
        else:
            entry["fb"].append((fb, raw))
            if orphan:
                heapq.heappush(self._deadlines.setdefault(partition, []), (fb.ts + self.window, 1, rid))
        self._feedback[rid] = entry

    # --- closing
    def _close_due(self, partition: int, mark: float, *, forget_before: float) -> None:
        """Close requests and expire orphans whose deadline <= mark, in deadline (= ts) order; forget
        closed markers whose retention ended before the newest event time (never on idleness alone)."""
        heap = self._deadlines.get(partition)
        while heap and heap[0][0] <= mark:
            _, kind, rid = heapq.heappop(heap)
            if kind == 0:
                self._close_request(partition, rid)
            else:
                self._expire_orphan(partition, rid)
        forgets = self._forgets.get(partition)
        while forgets and forgets[0][0] <= forget_before:
            _, _, rid = heapq.heappop(forgets)
            if self._closed.pop(rid, None) is None and rid in self.stores["closed"]:
                self._put("closed", partition, rid, None)

    def _close_request(self, partition: int, rid: bytes) -> None:
        arrived = self._arrived.pop(rid, None)
        if arrived is not None:
            (_, user_id, ts, _), items, shared, context = arrived
        else:
            stored = self.stores["impressions"].get(rid)
            if stored is None:
                return  # already closed (a stale heap entry)
            meta, items_raw, shared, context = stored.split(b"\n", 3)
            _, user_id, ts, _ = orjson.loads(meta)
            items = decode_items(items_raw)
            self._put("impressions", partition, rid, None)
        feedback = {f.item_id: (f, raw) for f, raw in self._take_feedback(partition, rid)}
        try:
            self._score(partition, user_id, ts, items, sample_tail(shared, context), feedback, context)
        except SchemaError as exc:   # a new user's context, read here for the first time (fast_schemas)
            as_sent = b"".join((shared[:-1], b',"items":', encode(items), b',"context":', context, b"}"))
            self._dead(topic="impressions", reason=exc.reason, original=as_sent, key=user_key(user_id))
        self.stats.joined_requests += 1
        self.stats.joined_feedback += len(feedback)
        forget_at = ts + self.window + self.cfg.closed_retention_s
        marker = {"p": partition, "forget_at": forget_at,
                  "fb": {str(k): [f.ts, f.play_time_s] for k, (f, _) in feedback.items()}}
        self._closed[rid] = (partition, orjson.dumps(marker))
        heapq.heappush(self._forgets.setdefault(partition, []), (forget_at, 2, rid))

    def _score(self, partition: int, user_id: int, ts: float, items: list, tail: bytes,
               feedback: dict[int, tuple[Feedback, bytes]], context: bytes) -> None:
        """The samples of one closed request, q against the user's earlier plays (streaming/history.py)."""
        uid = user_key(user_id)
        history = self.stores["users"].get(uid)
        if history is None:   # a new user starts from the plays of the served context
            durations, play_times = context_plays(context)
            history = hist.warm_start(durations, play_times, keep=self.cfg.history_len, beta=self.cfg.duration_beta)
        buckets = self._buckets([item.duration_s for item in items])
        joined = [feedback.get(item.item_id) for item in items]
        scores, history = hist.score_items(history, ts, buckets,
                                           [None if f is None else f[0].play_time_s for f in joined])
        outputs = self.batch.outputs
        for item, bucket, f, q in zip(items, buckets, joined, scores):
            sample = SampleItem(item.item_id, item.semantic_id, item.duration_s, item.logprob,
                                None if f is None else msgspec.Raw(f[1]), q, bucket)
            outputs.append(Output("samples", partition, uid, sample_bytes(sample, tail)))
        self.stats.samples += len(items)
        self._put("users", partition, uid, history[-self.cfg.history_len * hist.HISTORY_ROW:])

    def _expire_orphan(self, partition: int, rid: bytes) -> None:
        if rid in self._arrived or rid in self.stores["impressions"]:
            return  # its impression came: the request's own deadline closes it
        for f, raw in self._take_feedback(partition, rid):
            self._dead(topic="feedback", reason=f"no impression for request_id {f.request_id!r} of user_id "
                       f"{f.user_id} within the feedback window", original=raw, key=user_key(f.user_id))

    def rebuild_deadlines(self) -> None:
        """Derive the deadline heaps from the stores (after a restart or a rebalance)."""
        self._store_arrived()   # this batch's open state too
        heaps: dict[int, list] = {}
        forgets: dict[int, list] = {}
        for rid, raw in self.stores["impressions"].items():
            partition, _, ts, _ = orjson.loads(raw[:raw.index(b"\n")])
            heaps.setdefault(partition, []).append((ts + self.window, 0, rid))
        for rid in self.stores["feedback"]:
            entry = self._feedback_entry(rid)
            if entry["fb"] and rid not in self.stores["impressions"]:
                ts = min(f.ts for f, _ in entry["fb"])
                heaps.setdefault(entry["p"], []).append((ts + self.window, 1, rid))
        for rid, raw in self.stores["closed"].items():
            entry = orjson.loads(raw)
            forgets.setdefault(entry["p"], []).append((entry["forget_at"], 2, rid))
        for heap in (*heaps.values(), *forgets.values()):
            heapq.heapify(heap)
        self._deadlines, self._forgets = heaps, forgets
