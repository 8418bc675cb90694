"""The Faust engine of the join worker (`stream.engine = "faust"`, the reference): impressions + feedback into samples.

Invariant: at-least-once, and no sample is lost by a crash at any point. Each agent works in batches
(`take_events`) and finishes a batch in this order:
  1. produce the batch's outputs (joined records / samples / dead letters) and wait for their acks;
  2. only then send the batch's state changes to the Tables' changelogs;
  3. Faust acks the input events; it flushes the producer before it commits their offsets.
A SIGKILL between 1 and 2 replays the batch on restart against the state of before the batch and
re-emits the same records (a duplicate, identical; consumers dedupe by `(request_id, item_id)`,
see `SampleDeduplicator`); a kill anywhere else re-emits nothing or nothing new.

Agents (one per job):
  - `join_requests`: impressions + feedback + ticks (co-partitioned by request_id) -> `joined`
    (keyed by user_id); Tables `impressions`, `feedback`, `closed` (see streaming/join.py). After
    each batch's joined records are acknowledged it sends a watermark heartbeat ("partition p has
    closed every request with ts + window <= mark") to every `joined` partition.
  - `score_samples`: `joined` -> `samples` (keyed by request_id) with q; Tables `users`, `waiting`
    (requests wait until every join partition's heartbeat passed them, then score in ts order).
  - a timer sends one tick per partition every `tick_interval_s` so idle partitions still close,
    and repeats the heartbeats.
Outputs and changelog records go through the app's transport producer as whole record batches per
topic partition (`JoinWorker.produce`), not `Topic.send`/`Table.__setitem__` nor per-message `send`:
per-message machinery cost more than the join itself.

Broker limits met here (embedded Tansu): no exactly-once (its InitProducerId v0 fails with aiokafka),
so at-least-once with idempotent consumers; recovery's offset consistency check is off and Table
recovery reads to the true end of each changelog (`count_every_changelog_record`: ListOffsets
LATEST answers the last batch's base offset + 1); short session timeouts make group joins quick.

    onerec worker --set stream.engine='"faust"'     # see streaming/worker.py
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

import faust
import orjson

from streaming.config import StreamConfig
from streaming.join import WATERMARK_KEY, Batch, RequestJoiner, UserScorer, watermark_heartbeat
from streaming.client import send_record_batches, true_end_offsets  # noqa: F401
from streaming.partitioner import default_partition  # noqa: F401
from streaming.topics import ensure_topics, topic_name

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
    """The Faust app, its topics and Tables, and the two state machines it drives."""

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
        self.kind_of_topic = {topic_name(cfg, k): k for k in ("impressions", "feedback", "ticks", "joined")}
        self.inputs = self.app.topic(topic_name(cfg, "impressions"), topic_name(cfg, "feedback"),
                                     topic_name(cfg, "ticks"), partitions=cfg.partitions,
                                     key_serializer="raw", value_serializer="raw")
        self.ticks = topic("ticks")
        self.joined = topic("joined")
        self.outputs = {"joined": self.joined, "samples": topic("samples"), "dead-letters": topic("dead-letters")}
        # keys and values are bytes: the app's raw serializers apply to the changelogs too
        table = lambda name: self.app.Table(name, partitions=cfg.partitions, key_type=bytes,  # noqa: E731
                                            value_type=bytes)
        self.tables = {name: table(name) for name in RequestJoiner.tables + UserScorer.tables}
        self.output_names = {kind: topic_name(cfg, kind) for kind in self.outputs}
        self.changelog_names = {name: t.changelog_topic.get_topic_name() for name, t in self.tables.items()}
        self.closed_through: dict[int, float] = {}   # join partition -> latest mark whose records are acked
        self._heartbeat_lock = asyncio.Lock()
        self.batches = {"join": 0, "score": 0}
        self.timing = {"send": 0.0, "ack": 0.0, "changelog": 0.0, "logic": 0.0}
        self.batch_events = {"join": 0, "score": 0}
        self.joiner = RequestJoiner(cfg, {n: self.tables[n].data for n in RequestJoiner.tables})
        self.scorer = UserScorer(cfg, {n: self.tables[n].data for n in UserScorer.tables})
        self.app.agent(self.inputs, name="join_requests")(self.join_requests)
        self.app.agent(self.joined, name="score_samples")(self.score_samples)
        self.app.timer(cfg.tick_interval_s)(self.send_ticks)
        self.app.timer(10.0)(self.report)

    def count_every_changelog_record(self) -> None:
        """Table recovery must read every changelog record: correct the broker's short end offsets.

        Faust restores a Table up to the changelog's end offset (ListOffsets LATEST). The embedded
        broker answers with the last batch's base offset + 1, so the rest of that batch (the newest
        state: pending impressions, closed markers) would be skipped - a restart could lose samples.
        Against a real Kafka cluster this is a no-op. (Called by `run_worker`, not the constructor:
        touching `app.consumer` starts its thread's event loop.)
        """
        consumer = self.app.consumer
        reported_highwaters = consumer.highwaters

        async def highwaters(*tps):
            reported = await reported_highwaters(*tps)
            return await asyncio.to_thread(true_end_offsets, self.cfg, reported)

        consumer.highwaters = highwaters

    async def join_requests(self, stream):
        async for events in stream.take_events(self.cfg.batch_max, within=self.cfg.batch_within_s):
            self.batches["join"] += 1
            self.batch_events["join"] += len(events)
            t0 = time.perf_counter()
            for event in events:
                msg = event.message
                self.joiner.on_message(self.kind_of_topic[msg.topic], msg.partition, msg.key, msg.value)
            self.joiner.close_due()
            self.timing["logic"] += time.perf_counter() - t0
            batch = self.joiner.drain()
            await self.commit(batch)
            changed = {p: m for p, m in batch.closed_through.items() if m != self.closed_through.get(p)}
            self.closed_through.update(changed)   # the latest mark: it falls back when an idle input resumes
            await self.send_heartbeats(changed)

    async def score_samples(self, stream):
        async for events in stream.take_events(self.cfg.batch_max, within=self.cfg.batch_within_s):
            self.batches["score"] += 1
            self.batch_events["score"] += len(events)
            for event in events:
                msg = event.message
                self.scorer.on_joined(msg.partition, msg.key, msg.value)
            self.scorer.release()
            await self.commit(self.scorer.drain())

    async def commit(self, batch: Batch) -> None:
        """Outputs first, acknowledged; then the state changes (see the module invariant)."""
        if not len(batch):
            return
        t0 = time.perf_counter()
        pending = await self.produce([(self.output_names[o.kind], None, o.key, o.value) for o in batch.outputs])
        t1 = time.perf_counter()
        if pending:
            await asyncio.gather(*pending)   # raises if the broker refused one: the agent crashes, no commit
        t2 = time.perf_counter()
        # then the state changes, straight to the changelog topics (Faust flushes the producer
        # before it commits the input offsets)
        await self.produce([(self.changelog_names[w.table], w.partition, w.key, w.value)
                            for w in batch.writes.values()])
        self.timing["send"] += t1 - t0
        self.timing["ack"] += t2 - t1
        self.timing["changelog"] += time.perf_counter() - t2

    async def produce(self, records: list[tuple[str, int | None, bytes, bytes | None]]) -> list:
        """Queue (topic, partition or None = by key, key, value) records as whole record batches through
        the app's transport producer (`streaming.client.send_record_batches`); return their futures."""
        if not records:
            return []
        producer = self.app.producer._ensure_producer()   # the AIOKafkaProducer underneath
        return await send_record_batches(producer, records, self.cfg.partitions)

    async def send_heartbeats(self, marks: dict[int, float]) -> None:
        """Tell every scorer partition how far each join partition has closed (after the acks of
        the joined records they cover, so a heartbeat never overtakes a record).

        The agent and the tick timer both send; stage 2 keeps the latest mark per source, so the
        sends are serialized and each sends the mark current when it is sent, never a stale copy."""
        async with self._heartbeat_lock:
            for source in marks:
                beat = watermark_heartbeat(source, self.closed_through[source])
                for partition in range(self.cfg.partitions):
                    await self.joined.send(key=WATERMARK_KEY, value=beat, partition=partition)

    async def send_ticks(self) -> None:
        now = orjson.dumps(time.time())
        for partition in range(self.cfg.partitions):
            await self.ticks.send(key=b"tick", value=now, partition=partition)
        await self.send_heartbeats(dict(self.closed_through))

    async def report(self) -> None:
        log.info("join %s | score %s | batches %s events %s timing %s", self.joiner.stats, self.scorer.stats,
                 self.batches, self.batch_events, {k: round(v, 2) for k, v in self.timing.items()})


def build_app(cfg: StreamConfig, **kwargs) -> faust.App:
    return JoinWorker(cfg, **kwargs).app


def run_worker(cfg: StreamConfig, *, loglevel: str = "warning", create_topics: bool = True) -> int:
    """Run the worker in this process until SIGTERM/SIGINT."""
    if create_topics:
        ensure_topics(cfg)
    worker = JoinWorker(cfg)
    worker.count_every_changelog_record()
    faust_worker = faust.Worker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    faust_worker.execute_from_commandline()   # returns via SystemExit when stopped
    return 0
