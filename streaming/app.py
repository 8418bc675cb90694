"""The Faust engine of the join worker (`stream.engine = "faust"`, the reference): impressions + feedback into samples.

Invariant: at-least-once, and no sample is lost by a crash at any point: every batch goes through
the one commit path of streaming/commit.py (outputs acknowledged, then the changelog), and Faust
commits the offsets of the events an agent acknowledged only after it flushed its producer (so the
changelog records are out first). A SIGKILL before the changelog replays the batch on restart
against the state of before the batch and re-emits the same records (identical; consumers dedupe by
`(request_id, item_id)`).

Idiomatic Faust over the same one-stage state machine as the batched engine (`streaming.join.UserJoin`):
  - one agent per input, `join_impressions` and `join_feedback`, over the co-partitioned (keyed by
    user id) topics; each takes a batch (`take_events`), feeds it to the state machine, closes the due
    windows and commits the batch;
  - four Tables (`impressions`, `feedback`, `closed`, `users`) hold the state; their stores are the
    state machine's stores, and its changes reach their changelogs through each Table's changelog
    topic (`changelog_topic.send_soon`, the call Faust's own `Table.__setitem__` makes);
  - outputs go through Faust topics (`Topic.send`, awaited to their acknowledgements);
  - a timer closes the windows of idle partitions every `tick_interval_s` (it commits like a batch).
The agents and the timer share the state machine; a lock runs one batch at a time through it and its
commit, so a batch's state is never built on another's uncommitted one.

Broker limits met here (embedded Tansu): no exactly-once (its InitProducerId v0 fails with aiokafka),
so at-least-once with idempotent consumers; recovery's offset consistency check is off. Tansu answers
ListOffsets LATEST with the last record batch's base offset + 1, so Faust's Table recovery can stop
short of the newest changelog records after a restart (the batched engine reads to the fetch high
watermark instead): one reason the batched engine is the default and runs the SIGKILL test.

    onerec worker --set stream.engine='"faust"'     # see streaming/worker.py
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

import faust

from streaming.commit import commit_batch
from streaming.config import StreamConfig
from streaming.join import TABLES, Output, StateWrite, UserJoin
from streaming.topics import check_layout, ensure_topics, topic_name

log = logging.getLogger("onerec.worker")


def _credentials(cfg: StreamConfig):
    if cfg.security_protocol == "PLAINTEXT":
        return None
    if cfg.security_protocol == "SSL":
        return faust.SSLCredentials(cfg.ssl_context())
    ssl_context = cfg.ssl_context() if cfg.security_protocol == "SASL_SSL" else None
    return faust.SASLCredentials(username=cfg.sasl_username, password=cfg.sasl_password,
                                 ssl_context=ssl_context, mechanism=cfg.sasl_mechanism)


class JoinWorker:
    """The Faust app, its topics and Tables, and the one-stage state machine (`UserJoin`) its agents drive."""

    def __init__(self, cfg: StreamConfig, *, datadir: str | Path | None = None):
        self.cfg = cfg
        datadir = Path(datadir) if datadir else Path(tempfile.gettempdir()) / "onerec-faust" / cfg.app_id
        datadir.mkdir(parents=True, exist_ok=True)   # Faust creates only the last level
        session_s = cfg.session_timeout_ms / 1000
        self.app = faust.App(
            cfg.app_id,
            broker=[f"kafka://{s}" for s in cfg.servers()],
            broker_credentials=_credentials(cfg),
            store=cfg.faust_store,
            datadir=str(datadir),
            topic_partitions=cfg.partitions,
            topic_replication_factor=cfg.replication_factor,
            processing_guarantee="at_least_once",   # exactly_once needs InitProducerId, see module doc
            key_serializer="raw",
            value_serializer="raw",
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=session_s,
            broker_heartbeat_interval=max(0.1, session_s / 10),
            broker_rebalance_timeout=max(2 * session_s, 10.0),
            broker_commit_interval=1.0,
            stream_recovery_delay=0.0,
            recovery_consistency_check=False,
            table_standby_replicas=0,
            producer_acks=-1,
            producer_linger_ms=1,
            producer_max_batch_size=1024 * 1024,    # 16 KiB (the default) holds ~5 impressions: every send
            producer_max_request_size=8 * 1024 * 1024,  # then waits a broker round trip
            consumer_max_fetch_size=8 * 1024 * 1024,
            web_enabled=False,
        )
        topic = lambda kind: self.app.topic(topic_name(cfg, kind), partitions=cfg.partitions,  # noqa: E731
                                            key_serializer="raw", value_serializer="raw", internal=False)
        self.inputs = {kind: topic(kind) for kind in ("impressions", "feedback")}
        self.outputs = {kind: topic(kind) for kind in ("samples", "dead-letters")}
        # keys and values are bytes: the app's raw serializers apply to the changelogs too
        self.tables = {name: self.app.Table(name, partitions=cfg.partitions, key_type=bytes, value_type=bytes)
                       for name in TABLES}
        self.join = UserJoin(cfg, {name: table.data for name, table in self.tables.items()})
        self.lock = asyncio.Lock()
        self.batches = {"impressions": 0, "feedback": 0, "timer": 0}
        self.batch_events = {"impressions": 0, "feedback": 0}
        self.timing = {"logic": 0.0, "outputs": 0.0, "changelog": 0.0}
        self.app.agent(self.inputs["impressions"], name="join_impressions")(self.join_impressions)
        self.app.agent(self.inputs["feedback"], name="join_feedback")(self.join_feedback)
        self.app.timer(cfg.tick_interval_s)(self.close_idle)
        self.app.timer(10.0)(self.report)

    async def join_impressions(self, stream):
        async for events in stream.take_events(self.cfg.batch_max, within=self.cfg.batch_within_s):
            await self.run_batch("impressions", events)

    async def join_feedback(self, stream):
        async for events in stream.take_events(self.cfg.batch_max, within=self.cfg.batch_within_s):
            await self.run_batch("feedback", events)

    async def run_batch(self, kind: str, events) -> None:
        """One batch of one input through the state machine and the commit path (Faust acks the
        events, and later commits their offsets, when the agent takes its next batch)."""
        async with self.lock:
            t0 = time.perf_counter()
            for event in events:
                msg = event.message
                self.join.on_message(kind, msg.partition, msg.key, msg.value)
            self.join.close_due()
            batch = self.join.drain()
            self.timing["logic"] += time.perf_counter() - t0
            self.batches[kind] += 1
            self.batch_events[kind] += len(events)
            await commit_batch(self, batch, {})

    async def close_idle(self) -> None:
        """Close the windows that idle partitions' wall clocks closed (no input event needed)."""
        async with self.lock:
            self.join.close_due()
            batch = self.join.drain()
            if len(batch):
                self.batches["timer"] += 1
                await commit_batch(self, batch, {})

    # ---- the Sink of streaming/commit.py
    async def send_outputs(self, outputs: list[Output]) -> None:
        t0 = time.perf_counter()
        pending = [await self.outputs[o.kind].send(key=o.key, value=o.value, partition=o.partition)
                   for o in outputs]
        await asyncio.gather(*pending)   # raises if the broker refused one: the agent crashes, no commit
        self.timing["outputs"] += time.perf_counter() - t0

    async def send_changelog(self, writes: list[StateWrite]) -> None:
        """Into each Table's changelog, as `Table.__setitem__` would; Faust flushes them before it
        commits the input offsets."""
        t0 = time.perf_counter()
        for w in writes:
            self.tables[w.table].changelog_topic.send_soon(key=w.key, value=w.value, partition=w.partition,
                                                          key_serializer="raw", value_serializer="raw")
        self.timing["changelog"] += time.perf_counter() - t0

    async def commit_offsets(self, offsets: dict) -> None:
        """Faust commits the offsets of acknowledged events itself (module docstring)."""

    async def report(self) -> None:
        log.info("join %s | batches %s events %s timing %s", self.join.stats, self.batches, self.batch_events,
                 {k: round(v, 2) for k, v in self.timing.items()})


def run_worker(cfg: StreamConfig, *, loglevel: str = "warning", create_topics: bool = True) -> int:
    """Run the worker in this process until SIGTERM/SIGINT."""
    if create_topics:
        ensure_topics(cfg)
    check_layout(cfg)   # refuses topics written under another keying, with the way out
    worker = JoinWorker(cfg)
    faust_worker = faust.Worker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    faust_worker.execute_from_commandline()   # returns via SystemExit when stopped
    return 0
