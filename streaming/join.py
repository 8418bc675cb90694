"""The join and the reward shaping as plain state machines; streaming/app.py runs them in Faust agents.

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
deleted within one batch writes nothing: the changelog never had it). Watermarks and deadline heaps are derived from the
stores and rebuilt after a restart.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import numpy as np
import orjson

from streaming import schemas
from streaming.config import StreamConfig
from streaming.reward import duration_bucket, engagement_score
from streaming.schemas import SchemaError

Store = MutableMapping[bytes, bytes]
INPUTS = ("impressions", "feedback")
MAX_MARK = 1e18   # "everything": an idle partition's watermark, JSON-safe


@dataclass
class Output:
    kind: str            # topic kind: "joined", "samples", "dead-letters"
    key: bytes
    value: bytes


@dataclass
class StateWrite:
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
        store, slot = self.stores[table], (table, key)
        if slot not in self.batch.writes and slot not in self.batch.created and key not in store:
            self.batch.created.add(slot)
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
        if value is None and slot in self.batch.created:
            # created and deleted within this batch: the changelog never had it, no tombstone needed
            self.batch.writes.pop(slot, None)
        else:
            self.batch.writes[slot] = StateWrite(table, partition, key, value)

    def _dead(self, *, topic: str, reason: str, original: bytes, key: bytes | None) -> None:
        letter = schemas.dead_letter(topic=topic, reason=reason, original=original, ts=self.wall_clock())
        self.batch.outputs.append(Output("dead-letters", key or b"", schemas.encode_dead_letter(letter)))
        self.stats.dead_letters += 1

    def drain(self) -> Batch:
        """Hand over what this batch produced and start a new one."""
        batch, self.batch = self.batch, Batch()
        return batch


class RequestJoiner(_Stage):
    """Stage 1: impressions x feedback by request_id, closed by event-time windows."""

    tables = ("impressions", "feedback", "closed")

    def __init__(self, cfg: StreamConfig, stores: dict[str, Store], *, wall_clock: Callable[[], float] = time.time):
        super().__init__(cfg, stores, wall_clock=wall_clock)
        self.window = float(cfg.feedback_window_s)
        self.max_ts: dict[tuple[int, str], float] = {}      # (partition, input) -> largest event ts read
        self.last_wall: dict[tuple[int, str], float] = {}   # (partition, input) -> wall time of its last event
        self.first_wall: dict[int, float] = {}              # partition -> wall time it was first seen
        self._deadlines: dict[int, list] = {}          # partition -> heap of (event ts, kind, request_id)

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
                self._on_impression(partition, schemas.decode_impression(raw), raw)
            elif topic_kind == "feedback":
                self._on_feedback(partition, schemas.decode_feedback(raw), raw)
            else:
                raise SchemaError(f"unexpected topic kind {topic_kind!r}")
        except SchemaError as exc:
            self._dead(topic=topic_kind, reason=exc.reason, original=raw, key=key)

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

    def _advance(self, partition: int, kind: str, ts: float) -> None:
        if ts > self.max_ts.get((partition, kind), float("-inf")):
            self.max_ts[(partition, kind)] = ts

    def _on_impression(self, partition: int, imp: schemas.Impression, raw: bytes) -> None:
        self.stats.impressions += 1
        self._advance(partition, "impressions", imp["ts"])
        rid = imp["request_id"].encode()
        if rid in self.stores["closed"]:
            self.stats.duplicates += 1      # redelivery of a request already joined
            return
        old = self.stores["impressions"].get(rid)
        if old is not None:
            if orjson.loads(old)["imp"] == imp:
                self.stats.duplicates += 1
                return
            self._dead(topic="impressions", reason=f"request_id {imp['request_id']!r} already used by a "
                       "different impression", original=raw, key=rid)
            return
        self._put("impressions", partition, rid, orjson.dumps({"p": partition, "imp": imp}))
        heapq.heappush(self._deadlines.setdefault(partition, []), (imp["ts"] + self.window, 0, rid))
        waiting = self.stores["feedback"].get(rid)
        if waiting is not None:   # feedback that arrived first: check it against the impression now
            entry = orjson.loads(waiting)
            kept = [f for f in entry["fb"] if self._joinable(imp, f["event"], f["raw"].encode())]
            entry["fb"] = kept
            self._put("feedback", partition, rid, orjson.dumps(entry) if kept else None)

    def _joinable(self, imp: schemas.Impression, fb: schemas.Feedback, raw: bytes) -> bool:
        """Feedback that can never join this impression becomes a dead letter here."""
        rid = imp["request_id"]
        if fb["user_id"] != imp["user_id"]:
            reason = f"user_id {fb['user_id']} does not match the impression's user_id {imp['user_id']}"
        elif all(item["item_id"] != fb["item_id"] for item in imp["items"]):
            reason = f"item_id {fb['item_id']} was not shown in request {rid!r}"
        elif fb["ts"] > imp["ts"] + self.window:
            reason = (f"late feedback: ts {fb['ts']} is after the feedback window of request {rid!r} "
                      f"(impression ts {imp['ts']} + {self.window} s)")
        else:
            return True
        self._dead(topic="feedback", reason=reason, original=raw, key=rid.encode())
        return False

    def _on_feedback(self, partition: int, fb: schemas.Feedback, raw: bytes) -> None:
        self.stats.feedback += 1
        self._advance(partition, "feedback", fb["ts"])
        rid = fb["request_id"].encode()
        closed = self.stores["closed"].get(rid)
        if closed is not None:
            joined = orjson.loads(closed)["fb"].get(str(fb["item_id"]))
            if joined is not None and joined == [fb["ts"], fb["play_time_s"]]:
                self.stats.duplicates += 1   # the same feedback, already in a sample
            else:
                self._dead(topic="feedback", reason=f"late feedback: the window of request "
                           f"{fb['request_id']!r} closed before it arrived", original=raw, key=rid)
            return
        imp_raw = self.stores["impressions"].get(rid)
        if imp_raw is not None and not self._joinable(orjson.loads(imp_raw)["imp"], fb, raw):
            return
        entry_raw = self.stores["feedback"].get(rid)
        entry = orjson.loads(entry_raw) if entry_raw is not None else {"p": partition, "fb": []}
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
            if imp_raw is None and entry_raw is None:  # an orphan so far: give it a deadline
                heapq.heappush(self._deadlines.setdefault(partition, []), (fb["ts"] + self.window, 1, rid))
        self._put("feedback", partition, rid, orjson.dumps(entry))

    # --- closing
    def _close_due(self, partition: int, mark: float, *, forget_before: float) -> None:
        """Close requests and expire orphans whose deadline <= mark; forget closed markers whose
        retention ended before the newest event time (never on idleness alone)."""
        heap = self._deadlines.get(partition)
        keep = []
        while heap and heap[0][0] <= max(mark, forget_before):
            entry = heapq.heappop(heap)
            deadline, kind, rid = entry
            if kind == 2:
                if deadline <= forget_before:
                    if rid in self.stores["closed"]:
                        self._put("closed", partition, rid, None)
                else:
                    keep.append(entry)
            elif deadline > mark:
                keep.append(entry)
            elif kind == 0:
                self._close_request(partition, rid)
            else:
                self._expire_orphan(partition, rid)
        for entry in keep:
            heapq.heappush(heap, entry)

    def _close_request(self, partition: int, rid: bytes) -> None:
        imp_raw = self.stores["impressions"].get(rid)
        if imp_raw is None:
            return  # already closed (a stale heap entry)
        imp = orjson.loads(imp_raw)["imp"]
        fb_raw = self.stores["feedback"].get(rid)
        feedback = {str(f["event"]["item_id"]): f["event"] for f in orjson.loads(fb_raw)["fb"]} if fb_raw else {}
        joined = dict(imp, feedback=feedback)
        self.batch.outputs.append(Output("joined", str(imp["user_id"]).encode(), orjson.dumps(joined)))
        self.stats.joined_requests += 1
        self.stats.joined_feedback += len(feedback)
        self._put("impressions", partition, rid, None)
        if fb_raw is not None:
            self._put("feedback", partition, rid, None)
        forget_at = imp["ts"] + self.window + self.cfg.closed_retention_s
        marker = {"p": partition, "forget_at": forget_at,
                  "fb": {k: [f["ts"], f["play_time_s"]] for k, f in feedback.items()}}
        self._put("closed", partition, rid, orjson.dumps(marker))
        heapq.heappush(self._deadlines.setdefault(partition, []), (forget_at, 2, rid))

    def _expire_orphan(self, partition: int, rid: bytes) -> None:
        if rid in self.stores["impressions"]:
            return  # its impression came: the request's own deadline closes it
        fb_raw = self.stores["feedback"].get(rid)
        if fb_raw is None:
            return
        for f in orjson.loads(fb_raw)["fb"]:
            self._dead(topic="feedback", reason=f"no impression for request_id {f['event']['request_id']!r} "
                       "within the feedback window", original=f["raw"].encode(), key=rid)
        self._put("feedback", partition, rid, None)

    def rebuild_deadlines(self) -> None:
        """Derive the deadline heaps from the stores (after a restart or a rebalance)."""
        heaps: dict[int, list] = {}
        for rid, raw in self.stores["impressions"].items():
            entry = orjson.loads(raw)
            heaps.setdefault(entry["p"], []).append((entry["imp"]["ts"] + self.window, 0, rid))
        for rid, raw in self.stores["feedback"].items():
            entry = orjson.loads(raw)
            if entry["fb"] and rid not in self.stores["impressions"]:
                ts = min(f["event"]["ts"] for f in entry["fb"])
                heaps.setdefault(entry["p"], []).append((ts + self.window, 1, rid))
        for rid, raw in self.stores["closed"].items():
            entry = orjson.loads(raw)
            heaps.setdefault(entry["p"], []).append((entry["forget_at"], 2, rid))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._deadlines = heaps


_NO_PLAYS = {"item_id": [], "duration_s": [], "play_time_s": [], "flags": []}
_CHECKED_CONTEXT = {"profile": [0], "short": _NO_PLAYS, "long": _NO_PLAYS}   # stands in for a checked context
WATERMARK_KEY = b"\x00watermark"   # key of stage 1's watermark heartbeats on the joined topic


def watermark_heartbeat(source_partition: int, closed_through: float) -> bytes:
    """Stage 1 -> stage 2: every request of `source_partition` with ts + window <= closed_through is out."""
    return orjson.dumps({"src": source_partition, "closed_through": closed_through})


class UserScorer(_Stage):
    """Stage 2: per-user history -> q; one sample per shown item; redelivered requests dropped.

    A joined request waits (Table `waiting`) until every stage-1 partition has closed all requests
    up to its ts (their heartbeats say so); then requests are scored in ts order, so the history a
    request is scored against never depends on the order in which partitions closed windows.
    """

    tables = ("users", "waiting")

    def __init__(self, cfg: StreamConfig, stores: dict[str, Store], *, wall_clock: Callable[[], float] = time.time):
        super().__init__(cfg, stores, wall_clock=wall_clock)
        self.closed_through: dict[tuple[int, int], float] = {}   # (my partition, source partition) -> mark
        self._ready: dict[int, list] = {}                         # my partition -> heap of (ts, request_id)
        self._seen_partitions: set[int] = set()

    def on_joined(self, partition: int, key: bytes | None, raw: bytes) -> None:
        if partition not in self._seen_partitions:   # start, restart or rebalance: Tables just restored
            self._seen_partitions.add(partition)
            self.rebuild_waiting()
        if key == WATERMARK_KEY:
            beat = orjson.loads(raw)
            slot = (partition, int(beat["src"]))
            self.closed_through[slot] = max(self.closed_through.get(slot, float("-inf")), float(beat["closed_through"]))
            return
        try:
            joined = orjson.loads(raw)
            if not isinstance(joined, dict):
                raise SchemaError("joined record must be a JSON object")
            context = joined.get("context")
            if not isinstance(context, dict):
                raise SchemaError("context must be an object with profile, short, long")
            # Stage 1 validated the whole impression before joining it. The context's histories (the
            # bulk of the record) are read here only to warm-start a user the Table has not seen:
            # checked then; every other field is checked on every record.
            schemas.validate_impression(dict(joined, context=_CHECKED_CONTEXT))
            if str(joined["user_id"]).encode() not in self.stores["users"]:
                schemas.validate_context(context)
            if not isinstance(joined.get("feedback"), dict):
                raise SchemaError("feedback must be an object of item_id -> feedback")
        except (orjson.JSONDecodeError, SchemaError) as exc:
            self._dead(topic="joined", reason=getattr(exc, "reason", str(exc)), original=raw, key=key)
            return
        rid = joined["request_id"].encode()
        if rid not in self.stores["waiting"]:
            self._put("waiting", partition, rid, orjson.dumps(dict(joined, _p=partition)))
            heapq.heappush(self._ready.setdefault(partition, []), (joined["ts"], rid))

    def release(self) -> None:
        """Score, in ts order, the waiting requests that every source partition has closed through."""
        window = self.cfg.feedback_window_s
        for partition, heap in self._ready.items():
            marks = [self.closed_through.get((partition, s), float("-inf")) for s in range(self.cfg.partitions)]
            mark = min(marks)
            while heap and heap[0][0] + window <= mark:
                _, rid = heapq.heappop(heap)
                raw = self.stores["waiting"].get(rid)
                if raw is None:
                    continue
                self._put("waiting", partition, rid, None)
                self._score(partition, orjson.loads(raw))

    def rebuild_waiting(self) -> None:
        heaps: dict[int, list] = {}
        for rid, raw in self.stores["waiting"].items():
            joined = orjson.loads(raw)
            heaps.setdefault(joined["_p"], []).append((joined["ts"], rid))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._ready = heaps

    def _score(self, partition: int, joined: dict) -> None:
        uid = str(joined["user_id"]).encode()
        rid = joined["request_id"]
        state_raw = self.stores["users"].get(uid)
        state = orjson.loads(state_raw) if state_raw is not None else self._warm_start(joined["context"])
        if rid in state["r"]:
            self.stats.duplicates += 1
            return
        items = joined["items"]
        buckets = duration_bucket(np.asarray([it["duration_s"] for it in items]), self.cfg.duration_beta)  # (N,)
        history = state["h"]   # [bucket, play_time_s, ts], sorted by ts
        for item, bucket in zip(items, buckets.tolist()):
            fb = joined["feedback"].get(str(item["item_id"]))
            q = None
            if fb is not None:
                # only plays of requests that happened before this one count, whatever order they closed in
                earlier = [play for b, play, ts in history if b == bucket and ts < joined["ts"]]
                q = float(engagement_score(earlier, fb["play_time_s"]))
            sample = {
                "request_id": rid, "user_id": joined["user_id"], "item_id": item["item_id"], "ts": joined["ts"],
                "model_version": joined["model_version"], "source": joined["source"],
                "context": joined["context"], "semantic_id": item.get("semantic_id"),
                "duration_s": item["duration_s"], "logprob": item.get("logprob"),
                "feedback": fb, "q": q, "duration_bucket": bucket,
            }
            self.batch.outputs.append(Output("samples", rid.encode(), orjson.dumps(sample)))
            self.stats.samples += 1
        for item, bucket in zip(items, buckets.tolist()):
            fb = joined["feedback"].get(str(item["item_id"]))
            if fb is not None:
                history.append([bucket, fb["play_time_s"], joined["ts"]])
        history.sort(key=lambda entry: entry[2])
        state["h"] = history[-self.cfg.history_len:]
        state["r"] = (state["r"] + [rid])[-self.cfg.dedupe_requests:]
        self._put("users", partition, uid, orjson.dumps(state))

    def _warm_start(self, context: schemas.UserContext) -> dict:
        """A user the Table has never seen starts from the (duration, play time) pairs of the served context."""
        pairs = []
        for part in ("long", "short"):  # oldest first
            beh = context[part]
            if beh["duration_s"]:
                buckets = duration_bucket(np.asarray(beh["duration_s"]), self.cfg.duration_beta).tolist()
                pairs.extend([b, float(p), 0.0] for b, p in zip(buckets, beh["play_time_s"]))  # ts 0: before all
        return {"h": pairs[-self.cfg.history_len:], "r": []}
