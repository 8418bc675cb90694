"""The join and the reward shaping as plain state machines; the workers (streaming/batch_worker.py, and
streaming/app.py under Faust) drive them batch by batch.

Invariant (at-least-once, idempotent): for every impression, exactly one sample per shown item reaches
the samples topic at least once, and every copy of it is identical; redeliveries, duplicated events
and restarts produce at most repeated copies (same key, same `(request_id, item_id)`, same content),
never a lost or a different sample. This holds because each batch is committed in three ordered
steps (see app.py): (1) outputs are produced and acknowledged, (2) only then the state changes go to
the changelog, (3) only then Faust commits the input offsets. A crash between (1) and (2) replays the
batch against the old state and re-emits the same outputs; nothing is ever marked done before its
outputs are durable.

Two stages, because the join is keyed by request_id but q needs the user's own history:
- `RequestJoiner` (partitioned by request_id): pending impressions and feedback wait until the
  impression's feedback window closes in event time: the partition's watermark (the smaller of the
  largest ts read from impressions and from feedback on that partition, an input idle for
  `idle_close` wall seconds left out) passes `impression.ts + feedback_window_s`. Then one `joined`
  record (the impression + the feedback per item) goes out keyed by user_id.
- `UserScorer` (partitioned by user_id): keeps the user's recent (duration bucket, play time, ts)
  history (the last `history_len` by event time; a new user starts from the plays in the served
  context), scores q (section 3.1.1) of each item with feedback against the user's plays in the
  same bucket from requests with an earlier ts (so the order in which windows close does not
  matter), emits one sample per shown item, and remembers the request ids it has emitted (dedupe
  of redelivered `joined` records).

Feedback rules: joins iff it names a shown item of the same user, `ts <= impression.ts + window`, and
arrives before the window closes; repeated feedback for an item keeps the one with the largest ts
(an identical repeat is a duplicate); late, unknown-item, wrong-user and never-joined (orphan)
feedback become dead letters with the reason and the original bytes.

State lives in byte-keyed, byte-valued mappings (the Faust Tables' stores); every change is also
recorded as a `StateWrite` for the changelog, the last one per key and batch (a key created and
deleted within one batch writes nothing: the changelog never had it). Watermarks and deadline heaps
are derived from the stores and rebuilt after a restart. State a batch creates may wait in memory
until `drain()` (each stage's docstring says which); the stores and writes a batch leaves are the
same as if every change had gone to a store at once.

Bytes, not dicts, on the hot path: the user context (most of an impression's bytes) is decoded and
checked once, when the impression arrives, and encoded once; from then on it travels as those JSON
bytes and is spliced into the `joined` record and into every sample (`_with_member`). Values are
lines of JSON (orjson never writes a newline inside a document: lines split at the first newlines):
- `joined` record: line 1 the request without its context, with `feedback` (item_id -> feedback
  event); line 2 its context (`encode_joined` / `decode_joined`).
- `impressions` store: `[partition, user_id, ts, [shown item ids]]`, then the two lines of the joined
  record (without `feedback`); `waiting` store: `[partition, ts]`, then the joined record.
- `users` store: the number of recent requests (uint32), their 8-byte `request_hash`es, then the
  history: rows of three little-endian float64 (duration bucket, play_time_s, ts), sorted by ts
  (`encode_user` / `decode_user` / `history_rows`).
"""
from __future__ import annotations

import heapq
import struct
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import numpy as np
import orjson
import xxhash

from streaming import schemas
from streaming.config import StreamConfig
from streaming.fast_schemas import (ImpressionParts, JoinedRequest, Sample, context_plays, decode_joined_head,
                                    encode_sample, split_impression)
from streaming.reward import EMPTY_HISTORY_SCORE, duration_bucket
from streaming.schemas import SchemaError

Store = MutableMapping[bytes, bytes]
INPUTS = ("impressions", "feedback")
MAX_MARK = 1e18   # "everything": an idle partition's watermark, JSON-safe


class Output(NamedTuple):   # tuples of bytes and str: the garbage collector soon stops tracking them
    kind: str            # topic kind: "joined", "samples", "dead-letters"
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
    closed_through: dict[int, float] = field(default_factory=dict)  # stage 1: partition -> mark closed
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


class _Stage:
    """Shared plumbing: stores, the current batch, dead letters."""

    tables: tuple[str, ...] = ()

    def __init__(self, cfg: StreamConfig, stores: dict[str, Store], *, wall_clock: Callable[[], float] = time.time):
        missing = [t for t in self.tables if t not in stores]
        if missing:
            raise ValueError(f"{type(self).__name__} needs stores {self.tables}, missing {missing}")
        self.cfg, self.stores, self.wall_clock = cfg, stores, wall_clock
        self.batch = Batch()
        self.stats = JoinStats()

    def _put(self, table: str, partition: int, key: bytes, value: bytes | None) -> None:
        store, batch, slot = self.stores[table], self.batch, (table, key)
        created, writes = batch.created, batch.writes
        if slot not in writes and slot not in created and key not in store:
            created.add(slot)
        if value is None:
            store.pop(key, None)
            if slot in created:
                # created and deleted within this batch: the changelog never had it, no tombstone needed
                writes.pop(slot, None)
                return
        else:
            store[key] = value
        writes[slot] = StateWrite(table, partition, key, value)

    def _dead(self, *, topic: str, reason: str, original: bytes, key: bytes | None) -> None:
        letter = schemas.dead_letter(topic=topic, reason=reason, original=original, ts=self.wall_clock())
        self.batch.outputs.append(Output("dead-letters", key or b"", schemas.encode_dead_letter(letter)))
        self.stats.dead_letters += 1

    def drain(self) -> Batch:
        """Hand over what this batch produced and start a new one."""
        batch, self.batch = self.batch, Batch()
        return batch


def _first_line(value: bytes):
    """The JSON document on the first line of a stored value (its small header)."""
    end = value.find(b"\n")
    return orjson.loads(value if end < 0 else value[:end])


def _with_member(obj: bytes, name: bytes, value: bytes) -> bytes:
    """JSON object bytes `obj` (orjson's, not empty, without a member `name`) with `"name": value` added."""
    return b"".join((obj[:-1], b',"', name, b'":', value, b"}"))


def _joined_head(head: bytes, feedback: dict) -> bytes:
    """Line 1 of a joined record: the request without its context (`head`), with its feedback."""
    if b'"feedback"' in head:   # the impression has a member of that name (or the string): the join's wins
        return orjson.dumps(dict(orjson.loads(head), feedback=feedback))
    return _with_member(head, b"feedback", orjson.dumps(feedback))


def _impression_of(head: bytes, context: bytes) -> schemas.Impression:
    """The impression of the two lines stage 1 keeps, decoded (for the duplicate check)."""
    return dict(orjson.loads(head), context=orjson.loads(context))


def encode_joined(joined: dict) -> bytes:
    """A joined record (an impression with `feedback`) in stage 1's format: the request, then its context."""
    head = {name: value for name, value in joined.items() if name != "context"}
    return orjson.dumps(head) + b"\n" + orjson.dumps(joined["context"])


def decode_joined(raw: bytes) -> dict:
    """A joined record as one dict (impression fields, `context`, `feedback`); for tests and debugging."""
    head, _, context = raw.partition(b"\n")
    return dict(orjson.loads(head), context=orjson.loads(context))


class RequestJoiner(_Stage):
    """Stage 1: impressions x feedback by request_id, closed by event-time windows.

    State that a batch creates waits in `_arrived` (impressions: the lines of their store value, as a
    tuple of bytes and numbers, which the garbage collector soon stops tracking), `_feedback` (feedback
    entries it created or changed, decoded) and `_closed` (closed markers), and reaches the stores at
    `drain` (or before `rebuild_deadlines`): a request that opens and closes, and is forgotten, within
    one batch (the common case when catching up) never touches a store, and the stores and changelog
    after the batch are what they would be with every change stored.
    """

    tables = ("impressions", "feedback", "closed")

    def __init__(self, cfg: StreamConfig, stores: dict[str, Store], *, wall_clock: Callable[[], float] = time.time):
        super().__init__(cfg, stores, wall_clock=wall_clock)
        self.window = float(cfg.feedback_window_s)
        self.max_ts: dict[tuple[int, str], float] = {}      # (partition, input) -> largest event ts read
        self.last_wall: dict[tuple[int, str], float] = {}   # (partition, input) -> wall time of its last event
        self.first_wall: dict[int, float] = {}              # partition -> wall time it was first seen
        self._deadlines: dict[int, list] = {}  # partition -> heap of (event ts, kind 0 close / 1 expire, request_id)
        self._forgets: dict[int, list] = {}    # partition -> heap of (forget_at, 2, request_id) of closed markers
        # request_id -> (meta: (partition, user_id, ts, shown item ids), the impression without its context
        # as JSON, the context as JSON)
        self._arrived: dict[bytes, tuple[tuple, bytes, bytes]] = {}
        self._feedback: dict[bytes, dict] = {}   # request_id -> {"p": partition, "fb": [{"event", "raw"}]}
        self._closed: dict[bytes, tuple[int, bytes]] = {}   # request_id -> (partition, closed marker)

    # --- inputs
    def on_message(self, topic_kind: str, partition: int, key: bytes | None, raw: bytes) -> None:
        if partition not in self.first_wall:   # new to this process (start, restart, rebalance):
            self.rebuild_deadlines()           # its Table entries were just restored
            self.first_wall[partition] = self.wall_clock()
        if topic_kind == "ticks":
            return  # a tick only makes the batch end look at the wall clock (idle inputs)
        self.last_wall[(partition, topic_kind)] = self.wall_clock()
        try:
            if topic_kind == "impressions":
                self._on_impression(partition, split_impression(raw), raw)
            elif topic_kind == "feedback":
                self._on_feedback(partition, schemas.decode_feedback(raw), raw)
            else:
                raise SchemaError(f"unexpected topic kind {topic_kind!r}")
        except SchemaError as exc:
            self._dead(topic=topic_kind, reason=exc.reason, original=raw, key=key)

    def input_behind(self, partition: int, kind: str) -> None:
        """The reader knows records of this input wait to be read: it is not idle, whatever the wall
        clock says (a slow, backlogged or just-restored reader must not close windows early)."""
        self.last_wall[(partition, kind)] = self.wall_clock()

    def watermark(self, partition: int) -> float:
        """Event time up to which partition `partition` is complete: the smallest of the inputs'
        largest ts (impressions and feedback are read independently, one may run ahead), leaving
        out an input idle for `idle_close` wall seconds; +inf when both are idle."""
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
        """Close every window the watermarks have passed (called once per batch)."""
        for partition in self.first_wall:
            newest = max((self.max_ts.get((partition, k), float("-inf")) for k in INPUTS))
            mark = self.watermark(partition)
            self._close_due(partition, mark, forget_before=newest)
            if mark > float("-inf"):
                self.batch.closed_through[partition] = min(mark, MAX_MARK)

    def drain(self) -> Batch:
        self._store_arrived()
        return super().drain()

    def _advance(self, partition: int, kind: str, ts: float) -> None:
        if ts > self.max_ts.get((partition, kind), float("-inf")):
            self.max_ts[(partition, kind)] = ts

    # --- open state: this batch's (decoded) first, then the stores'
    def _meta(self, rid: bytes) -> Sequence | None:
        """(partition, user_id, ts, shown item ids) of the open impression of `rid`, or None."""
        arrived = self._arrived.get(rid)
        if arrived is not None:
            return arrived[0]
        value = self.stores["impressions"].get(rid)
        return None if value is None else _first_line(value)

    def _feedback_entry(self, rid: bytes) -> dict | None:
        """The feedback waiting for `rid`, decoded (changing it: put it into `_feedback`), or None."""
        entry = self._feedback.get(rid)
        if entry is None:
            raw = self.stores["feedback"].get(rid)
            if raw is not None:
                entry = orjson.loads(raw)
        return entry

    def _take_feedback(self, partition: int, rid: bytes) -> list[dict]:
        """Remove the feedback waiting for `rid`; returns its [{"event", "raw"}]."""
        entry = self._feedback.pop(rid, None)
        stored = self.stores["feedback"].get(rid)
        if stored is not None:
            entry = entry if entry is not None else orjson.loads(stored)
            self._put("feedback", partition, rid, None)
        return entry["fb"] if entry is not None else []

    def _store_arrived(self) -> None:
        """Put this batch's open state into the stores (recording the changelog writes)."""
        for rid, (meta, head, context) in self._arrived.items():
            self._put("impressions", meta[0], rid, b"\n".join((orjson.dumps(meta), head, context)))
        for rid, entry in self._feedback.items():
            if entry["fb"]:
                self._put("feedback", entry["p"], rid, orjson.dumps(entry))
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
        rid = imp.request_id.encode()
        if rid in self._closed or rid in self.stores["closed"]:
            self.stats.duplicates += 1      # redelivery of a request already joined
            return
        arrived = self._arrived.get(rid)
        if arrived is None:
            stored = self.stores["impressions"].get(rid)
            arrived = None if stored is None else stored.split(b"\n", 2)
        if arrived is not None:   # the request is open: a redelivery, or a clash
            if (arrived[1] == imp.head and arrived[2] == imp.context) or (
                    _impression_of(arrived[1], arrived[2]) == _impression_of(imp.head, imp.context)):
                self.stats.duplicates += 1
                return
            self._dead(topic="impressions", reason=f"request_id {imp.request_id!r} already used by a "
                       "different impression", original=raw, key=rid)
            return
        meta = (partition, imp.user_id, imp.ts, imp.item_ids)   # what feedback is checked against
        self._arrived[rid] = (meta, imp.head, imp.context)
        heapq.heappush(self._deadlines.setdefault(partition, []), (imp.ts + self.window, 0, rid))
        entry = self._feedback_entry(rid)
        if entry is not None:   # feedback that arrived first: check it against the impression now
            entry["fb"] = [f for f in entry["fb"] if self._joinable(meta, f["event"], f["raw"].encode())]
            self._feedback[rid] = entry

    def _joinable(self, meta: Sequence, fb: schemas.Feedback, raw: bytes) -> bool:
        """Feedback that can never join this impression (`meta`: partition, user_id, ts, shown item ids)
        becomes a dead letter here."""
        _, user_id, ts, shown = meta
        rid = fb["request_id"]
        if fb["user_id"] != user_id:
            reason = f"user_id {fb['user_id']} does not match the impression's user_id {user_id}"
        elif fb["item_id"] not in shown:
            reason = f"item_id {fb['item_id']} was not shown in request {rid!r}"
        elif fb["ts"] > ts + self.window:
            reason = (f"late feedback: ts {fb['ts']} is after the feedback window of request {rid!r} "
                      f"(impression ts {ts} + {self.window} s)")
        else:
            return True
        self._dead(topic="feedback", reason=reason, original=raw, key=rid.encode())
        return False

    def _on_feedback(self, partition: int, fb: schemas.Feedback, raw: bytes) -> None:
        self.stats.feedback += 1
        self._advance(partition, "feedback", fb["ts"])
        rid = fb["request_id"].encode()
        closed = self._closed[rid][1] if rid in self._closed else self.stores["closed"].get(rid)
        if closed is not None:
            joined = orjson.loads(closed)["fb"].get(str(fb["item_id"]))
            if joined is not None and joined == [fb["ts"], fb["play_time_s"]]:
                self.stats.duplicates += 1   # the same feedback, already in a sample
            else:
                self._dead(topic="feedback", reason=f"late feedback: the window of request "
                           f"{fb['request_id']!r} closed before it arrived", original=raw, key=rid)
            return
        meta = self._meta(rid)
        if meta is not None and not self._joinable(meta, fb, raw):
            return
        entry = self._feedback_entry(rid)
        orphan = meta is None and entry is None   # an orphan so far: it gets a deadline
        if entry is None:
            entry = {"p": partition, "fb": []}
        for i, f in enumerate(entry["fb"]):
            if f["event"]["item_id"] == fb["item_id"]:
                if f["event"] == fb:
                    self.stats.duplicates += 1
                    return
                if fb["ts"] >= f["event"]["ts"]:
                    entry["fb"][i] = {"event": fb, "raw": raw.decode()}
                break
        else:
            entry["fb"].append({"event": fb, "raw": raw.decode()})
            if orphan:
                heapq.heappush(self._deadlines.setdefault(partition, []), (fb["ts"] + self.window, 1, rid))
        self._feedback[rid] = entry

    # --- closing
    def _close_due(self, partition: int, mark: float, *, forget_before: float) -> None:
        """Close requests and expire orphans whose deadline <= mark; forget closed markers whose
        retention ended before the newest event time (never on idleness alone). Two heaps, so an
        entry is popped once, when it is due (one heap re-pushed every open request each batch)."""
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
            (_, user_id, ts, _), head, context = arrived
        else:
            stored = self.stores["impressions"].get(rid)
            if stored is None:
                return  # already closed (a stale heap entry)
            meta, head, context = stored.split(b"\n", 2)
            _, user_id, ts, _ = orjson.loads(meta)
            self._put("impressions", partition, rid, None)
        feedback = {str(f["event"]["item_id"]): f["event"] for f in self._take_feedback(partition, rid)}
        joined = _joined_head(head, feedback) + b"\n" + context
        self.batch.outputs.append(Output("joined", str(user_id).encode(), joined))
        self.stats.joined_requests += 1
        self.stats.joined_feedback += len(feedback)
        forget_at = ts + self.window + self.cfg.closed_retention_s
        marker = {"p": partition, "forget_at": forget_at,
                  "fb": {k: [f["ts"], f["play_time_s"]] for k, f in feedback.items()}}
        self._closed[rid] = (partition, orjson.dumps(marker))
        heapq.heappush(self._forgets.setdefault(partition, []), (forget_at, 2, rid))

    def _expire_orphan(self, partition: int, rid: bytes) -> None:
        if rid in self._arrived or rid in self.stores["impressions"]:
            return  # its impression came: the request's own deadline closes it
        for f in self._take_feedback(partition, rid):
            self._dead(topic="feedback", reason=f"no impression for request_id {f['event']['request_id']!r} "
                       "within the feedback window", original=f["raw"].encode(), key=rid)

    def rebuild_deadlines(self) -> None:
        """Derive the deadline heaps from the stores (after a restart or a rebalance)."""
        self._store_arrived()   # this batch's open state too
        heaps: dict[int, list] = {}
        forgets: dict[int, list] = {}
        for rid, raw in self.stores["impressions"].items():
            partition, _, ts, _ = _first_line(raw)
            heaps.setdefault(partition, []).append((ts + self.window, 0, rid))
        for rid, raw in self.stores["feedback"].items():
            entry = orjson.loads(raw)
            if entry["fb"] and rid not in self.stores["impressions"]:
                ts = min(f["event"]["ts"] for f in entry["fb"])
                heaps.setdefault(entry["p"], []).append((ts + self.window, 1, rid))
        for rid, raw in self.stores["closed"].items():
            entry = orjson.loads(raw)
            forgets.setdefault(entry["p"], []).append((entry["forget_at"], 2, rid))
        for heap in (*heaps.values(), *forgets.values()):
            heapq.heapify(heap)
        self._deadlines, self._forgets = heaps, forgets


WATERMARK_KEY = b"\x00watermark"   # key of stage 1's watermark heartbeats on the joined topic
BUCKET_MEMO_SIZE = 100_000         # duration -> bucket entries kept (video durations repeat)
HISTORY_DTYPE = "<f8"               # a user's history rows: little-endian float64
HISTORY_ROW = 24                    # bytes per row: bucket, play_time_s, ts
_FLOAT64 = struct.Struct(HISTORY_DTYPE[0] + "d")
_COUNT = struct.Struct("<I")


def watermark_heartbeat(source_partition: int, closed_through: float) -> bytes:
    """Stage 1 -> stage 2: every request of `source_partition` with ts + window <= closed_through is out.

    Marks of one source normally grow; an idle source's is MAX_MARK, and it falls back to a finite
    mark when the source has events again (stage 2 keeps the latest, so it waits for them)."""
    return orjson.dumps({"src": source_partition, "closed_through": closed_through})


def engagement_q(plays: np.ndarray, play_time: float) -> float:
    """`reward.engagement_score(plays, play_time)` for one play time, without its sort (the join's hot path)."""
    if plays.size == 0:
        return EMPTY_HISTORY_SCORE
    return int(np.count_nonzero(plays <= play_time)) / plays.size


def request_hash(request_id: str) -> bytes:
    """8 bytes that stand for a request id in a user's recent requests (XXH3-64). Two of a user's last
    `dedupe_requests` ids that collide (odds ~ 512 / 2**64 per request) would drop a sample."""
    return xxhash.xxh3_64_digest(request_id.encode())


def encode_user(recent: bytes, history: bytes) -> bytes:
    """A `users` store value: the number of recent requests (uint32 LE), their `request_hash`es
    (oldest first), then the history rows."""
    return _COUNT.pack(len(recent) // 8) + recent + history


def decode_user(value: bytes) -> tuple[bytes, bytes]:
    """(recent request hashes, history rows) of a `users` store value."""
    end = _COUNT.size + 8 * _COUNT.unpack_from(value)[0]
    return value[_COUNT.size:end], value[end:]


def _has_hash(recent: bytes, rid_hash: bytes) -> bool:
    """Whether `rid_hash` is one of the 8-byte hashes in `recent` (a match must start on a hash)."""
    at = recent.find(rid_hash)
    while at >= 0 and at % 8:
        at = recent.find(rid_hash, at + 1)
    return at >= 0


def recent_hashes(recent: bytes) -> list[bytes]:
    """The `request_hash`es of a user's recent requests, oldest first (for tests and debugging)."""
    return [recent[i:i + 8] for i in range(0, len(recent), 8)]


def history_rows(history: bytes) -> np.ndarray:
    """(H, 3) float64 rows [duration bucket, play_time_s, ts], sorted by ts, of a user's history bytes:
    appending and truncating rows are byte slices; numpy reads them without a copy."""
    return np.frombuffer(history, dtype=HISTORY_DTYPE).reshape(-1, 3)


class UserScorer(_Stage):
    """Stage 2: per-user history -> q; one sample per shown item; redelivered requests dropped.

    A joined request waits (Table `waiting`) until every stage-1 partition has closed all requests
    up to its ts (their heartbeats say so); then requests are scored in ts order, so the history a
    request is scored against never depends on the order in which partitions closed windows.
    Lateness: a stage-1 partition idle for `idle_close` says it has closed everything (MAX_MARK). If
    it gets events again, the latest heartbeat counts, so later requests wait for it again; but a
    request of another partition released in between is not scored again, so a user's earlier
    request arriving through the resumed partition misses that one's history (as late data does).
    A request that arrives and is scored within one batch (the common case when catching up) never
    reaches the store: it waits decoded in `_arrived`, and `drain` stores only the ones still waiting,
    which is what the changelog would hold anyway.
    """

    tables = ("users", "waiting")

    def __init__(self, cfg: StreamConfig, stores: dict[str, Store], *, wall_clock: Callable[[], float] = time.time):
        super().__init__(cfg, stores, wall_clock=wall_clock)
        self.closed_through: dict[tuple[int, int], float] = {}   # (my partition, source partition) -> mark
        self._ready: dict[int, list] = {}                         # my partition -> heap of (ts, request_id)
        self._seen_partitions: set[int] = set()
        self._bucket_of: dict[float, int] = {}                    # duration_s -> duration bucket
        # request_id -> warm-start history from its (checked) context, of the stored waiting requests of
        # users unknown on arrival (a cache: after a restart it is computed again)
        self._warm: dict[bytes, bytes] = {}
        # request_id -> (partition, line 1 decoded, context bytes, record, warm-start history or None): the
        # requests that arrived in this batch and wait; `drain` puts the rest into the `waiting` store
        self._arrived: dict[bytes, tuple[int, JoinedRequest, bytes, bytes, bytes | None]] = {}

    def on_joined(self, partition: int, key: bytes | None, raw: bytes) -> None:
        if partition not in self._seen_partitions:   # start, restart or rebalance: Tables just restored
            self._seen_partitions.add(partition)
            self.rebuild_waiting()
        if key == WATERMARK_KEY:
            beat = orjson.loads(raw)
            slot = (partition, int(beat["src"]))
            # the latest mark, not the largest: an idle source says "everything" (MAX_MARK) and, once it
            # has events again, a finite mark that new requests from other sources must wait for
            self.closed_through[slot] = float(beat["closed_through"])
            return
        head, newline, context = raw.partition(b"\n")
        try:
            if not newline:
                raise SchemaError("joined record must be a JSON object, then its context on a second line")
            if not (context.startswith(b"{") and context.endswith(b"}")):
                raise SchemaError("context must be an object with profile, short, long")
            # Stage 1 validated the whole impression and wrote its context's JSON bytes. The context (the
            # bulk of the record) is parsed here only to warm-start a user the Table has not seen: checked
            # then; every other field is checked on every record. Samples carry the context's bytes as they are.
            joined = decode_joined_head(head)
            warm = None
            if str(joined.head.user_id).encode() not in self.stores["users"]:
                warm = self._warm_start(*context_plays(context))
        except SchemaError as exc:
            self._dead(topic="joined", reason=exc.reason, original=raw, key=key)
            return
        rid = joined.head.request_id.encode()
        if rid not in self._arrived and rid not in self.stores["waiting"]:
            self._arrived[rid] = (partition, joined, context, raw, warm)
            heapq.heappush(self._ready.setdefault(partition, []), (joined.head.ts, rid))

    def release(self) -> None:
        """Score, in ts order, the waiting requests that every source partition has closed through."""
        window = self.cfg.feedback_window_s
        for partition, heap in self._ready.items():
            marks = [self.closed_through.get((partition, s), float("-inf")) for s in range(self.cfg.partitions)]
            mark = min(marks)
            while heap and heap[0][0] + window <= mark:
                _, rid = heapq.heappop(heap)
                arrived = self._arrived.pop(rid, None)
                if arrived is not None:
                    _, joined, context, _, warm = arrived
                    self._score(partition, joined, context, warm)
                    continue
                raw = self.stores["waiting"].get(rid)
                if raw is None:
                    continue
                self._put("waiting", partition, rid, None)
                _, head, context = raw.split(b"\n", 2)
                self._score(partition, decode_joined_head(head), context, self._warm.pop(rid, None))

    def drain(self) -> Batch:
        """Store the requests of this batch that still wait, then hand over the batch."""
        for rid, (partition, joined, _, raw, warm) in self._arrived.items():
            self._put("waiting", partition, rid, orjson.dumps([partition, joined.head.ts]) + b"\n" + raw)
            if warm is not None:
                self._warm[rid] = warm
        self._arrived.clear()
        return super().drain()

    def rebuild_waiting(self) -> None:
        heaps: dict[int, list] = {}
        for rid, raw in self.stores["waiting"].items():
            partition, ts = _first_line(raw)
            heaps.setdefault(partition, []).append((ts, rid))
        for rid, (partition, joined, *_) in self._arrived.items():
            heaps.setdefault(partition, []).append((joined.head.ts, rid))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._ready = heaps
        self._warm.clear()

    def _score(self, partition: int, joined: JoinedRequest, context: bytes, warm: bytes | None) -> None:
        """Samples of one request (`joined`: line 1 of its record; `context`: the context's JSON bytes;
        `warm`: the warm-start history from the context, if on arrival the user was new)."""
        head, play_times = joined
        uid = str(head.user_id).encode()
        rid = head.request_id
        key = rid.encode()
        state_raw = self.stores["users"].get(uid)
        if state_raw is None:
            recent, history = b"", warm if warm is not None else self._warm_start(*context_plays(context))
        else:
            recent, history = decode_user(state_raw)
        rid_hash = request_hash(rid)
        if _has_hash(recent, rid_hash):
            self.stats.duplicates += 1
            return
        ts, items, feedback = head.ts, head.items, head.feedback
        buckets = self._buckets([item.duration_s for item in items])
        values = np.frombuffer(history, dtype=HISTORY_DTYPE)   # (3 H,) rows bucket, play_time_s, ts
        # only plays of requests that happened before this one count, whatever order they closed in;
        # requests are scored in ts order, so usually every row is earlier
        in_order = not history or _FLOAT64.unpack_from(history, len(history) - 8)[0] < ts
        earlier = values if in_order else values[:3 * int(values[2::3].searchsorted(ts, side="left"))]
        earlier_bucket, earlier_play = earlier[0::3], earlier[1::3]
        plays = []   # bucket, play_time_s, ts of each of this request's feedback
        raw_context = msgspec.Raw(context)
        for item, bucket in zip(items, buckets):
            name = str(item.item_id)
            fb = feedback.get(name)
            q = None
            if fb is not None:
                play_time = play_times[name]
                q = engagement_q(earlier_play[earlier_bucket == bucket], play_time)
                plays += (bucket, play_time, ts)
            sample = Sample(rid, head.user_id, item.item_id, ts, head.model_version, head.source, item.semantic_id,
                            item.duration_s, item.logprob, fb, q, bucket, raw_context)
            self.batch.outputs.append(Output("samples", key, encode_sample(sample)))
            self.stats.samples += 1
        if plays:   # after the rows of every request with ts <= this one (as a stable sort by ts would)
            new_rows = struct.pack(f"<{len(plays)}d", *plays)
            if in_order:
                history += new_rows
            else:
                at = int(values[2::3].searchsorted(ts, side="right")) * HISTORY_ROW
                history = history[:at] + new_rows + history[at:]
        recent = (recent + rid_hash)[-8 * self.cfg.dedupe_requests:]
        self._put("users", partition, uid, encode_user(recent,
                                                       history[-self.cfg.history_len * HISTORY_ROW:]))

    def _buckets(self, durations: list[float]) -> list[int]:
        """`duration_bucket` of each duration, memoized."""
        memo = self._bucket_of
        if len(memo) > BUCKET_MEMO_SIZE:
            memo.clear()
        missing = [d for d in durations if d not in memo]
        if missing:
            buckets = duration_bucket(np.asarray(missing, dtype=np.float64), self.cfg.duration_beta)
            memo.update(zip(missing, buckets.tolist()))
        return [memo[d] for d in durations]

    def _warm_start(self, durations: list[float], play_times: list[float]) -> bytes:
        """A user the Table has never seen starts from the (duration, play time) pairs of the served context,
        long then short (oldest first; `fast_schemas.context_plays`), at ts 0 (before every request), the
        last `history_len` of them. Returns the history bytes."""
        keep = self.cfg.history_len
        durations, play_times = durations[-keep:], play_times[-keep:]
        rows = np.zeros((len(durations), 3), dtype=HISTORY_DTYPE)
        rows[:, 0] = duration_bucket(np.asarray(durations, dtype=np.float64), self.cfg.duration_beta)
        rows[:, 1] = play_times
        return rows.tobytes()
