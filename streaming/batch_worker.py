"""The batched join worker (the default engine): the one-stage join of streaming/join.py, driven batch by batch.

Invariant (the same as streaming/app.py's, at-least-once, no loss on SIGKILL): each batch of input
records is finished by `streaming.commit.commit_batch` (outputs acknowledged, then the changelog,
then the offsets), and nothing is marked done before what it produced is durable. A crash before
the offsets replays the batch on restart against the state restored from the changelogs and
re-emits identical records; consumers dedupe by `(request_id, item_id)`.
While a batch finishes (mostly waiting for the broker) the next one is fetched and joined in
memory; it starts finishing only after the previous one committed, so batches commit in order.

Why a second engine: Faust pays several hundred microseconds of per-event machinery (an Event
object, a queue hop, per-event ack bookkeeping) before any join logic runs; that capped the join at
~1.3k events/s on the KuaiRand week. Here one aiokafka consumer (group `cfg.app_id`, the same
group and offsets as the Faust app) fetches up to `batch_max` records per `getmany`, and the loop
hands them straight to `UserJoin` (streaming/join.py). The Faust app stays the
reference engine (`stream.engine = "faust"`); both read and write the same topics and records and use
the same consumer group and changelog names (`<app_id>-<table>-changelog`), so a deployment runs one
engine at a time (their group protocols differ: a group holding a member of one refuses the other).

Tables: each table is a dict; on every (re)assignment the worker drops its state and restores the
assigned partitions of every changelog from the beginning to the fetch high watermark (the true end:
the embedded broker's ListOffsets LATEST is short, see docs). Idle partitions still close their
windows: the loop runs `close_due` after every fetch, empty or not. An input counts as idle only when nothing is left to
read in it (position = fetch high watermark) - a backlogged or just-restored reader never closes a
window on the wall clock. Before it joins, the worker checks the namespace's topic layout
(`streaming.topics.check_layout`) and refuses topics written under another keying.

    onerec worker                                  # stream.engine = "batched" (default)
    onerec worker --set stream.engine='"faust"'    # the Faust app
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from streaming.client import send_record_batches
from streaming.commit import commit_batch
from streaming.config import StreamConfig
from streaming.join import TABLES, Batch, Output, StateWrite, UserJoin
from streaming.topics import check_layout, changelog_topic, ensure_changelog_topics, ensure_topics, topic_name

log = logging.getLogger("onerec.worker")


class _Rebalance(ConsumerRebalanceListener):
    """Finish the batch in flight before partitions move; rebuild the state after they moved."""

    def __init__(self, worker: "BatchJoinWorker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.worker.batch_lock:   # the batches in flight commit (or fail) first
            self.worker.generation += 1
            await self.worker.finished()

    async def on_partitions_assigned(self, assigned) -> None:
        async with self.worker.batch_lock:
            await self.worker.restore(sorted({tp.partition for tp in assigned}))


class BatchJoinWorker:
    """aiokafka consumer -> UserJoin -> `commit_batch` (produce, changelog, commit), per batch."""

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        self.kind_of_topic = {topic_name(cfg, k): k for k in ("impressions", "feedback")}
        self.output_names = {k: topic_name(cfg, k) for k in ("samples", "dead-letters")}
        self.changelog_names = {t: changelog_topic(cfg, t) for t in TABLES}
        self.batch_lock = asyncio.Lock()
        self.generation = 0                       # bumped on every rebalance: an older fetch is dropped
        self.partitions: list[int] = []           # partition numbers assigned (the same in every input)
        self.input_tps: dict[tuple[int, str], TopicPartition] = {}   # (partition, input) -> its TopicPartition
        self.stores: dict[str, dict[bytes, bytes]] = {t: {} for t in TABLES}
        self.join = UserJoin(cfg, self.stores)
        self.counts = {"batches": 0, "events": 0, "restored_records": 0}
        self.timing = {"fetch": 0.0, "logic": 0.0, "wait": 0.0, "outputs": 0.0, "changelog": 0.0, "commit": 0.0}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._finishing: asyncio.Task | None = None   # the previous batch's produce/changelog/commit

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        options = dict(cfg.client_options())
        self.producer = AIOKafkaProducer(**options, acks="all", linger_ms=1, max_batch_size=1024 * 1024,
                                         max_request_size=8 * 1024 * 1024, enable_idempotence=False)
        session_ms = cfg.session_timeout_ms
        self.consumer = AIOKafkaConsumer(
            **options, group_id=cfg.app_id, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, session_ms // 10),
            rebalance_timeout_ms=max(2 * session_ms, 10_000), max_poll_interval_ms=300_000,
            max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
        await self.producer.start()
        try:
            self.consumer.subscribe(list(self.kind_of_topic), listener=_Rebalance(self))
            await self.consumer.start()
            try:
                reporter = asyncio.create_task(self._report_every(10.0))
                try:
                    while not self._stopping.is_set():
                        await self.step()
                    await self.finished()
                finally:
                    reporter.cancel()
            finally:
                await self.consumer.stop()
        finally:
            await self.producer.stop()

    def stop(self) -> None:
        """Finish the batch in flight, then leave the group and exit `run` (SIGTERM/SIGINT)."""
        self._stopping.set()

    # ---- one batch -----------------------------------------------------------------------------
    async def step(self) -> None:
        t0 = time.perf_counter()
        generation = self.generation
        fetched = await self.consumer.getmany(timeout_ms=int(self.cfg.batch_within_s * 1000),
                                              max_records=self.cfg.batch_max)
        t1 = time.perf_counter()
        async with self.batch_lock:
            if generation != self.generation:
                return   # a rebalance happened while fetching: positions went back to the commits
            offsets: dict[TopicPartition, int] = {}
            n = 0
            on_message = self.join.on_message
            for tp, records in fetched.items():
                if not records:
                    continue
                kind = self.kind_of_topic[tp.topic]
                n += len(records)
                partition = tp.partition
                for r in records:
                    on_message(kind, partition, r.key, r.value)
                offsets[tp] = records[-1].offset + 1
            await self._pace_inputs()
            self.join.close_due()    # also on an empty fetch: idle partitions close by wall clock
            batch = self.join.drain()
            t2 = time.perf_counter()
            # the previous batch finished while this one was fetched and joined; this one finishes
            # while the next is: one batch in flight, committed strictly in order
            await self.finished()
            self._finishing = asyncio.create_task(self._finish(batch, offsets))
            self.counts["events"] += n
            self.counts["batches"] += 1 if n else 0
            self.timing["fetch"] += t1 - t0
            self.timing["logic"] += t2 - t1
            self.timing["wait"] += time.perf_counter() - t2

    async def _pace_inputs(self) -> None:
        """Keep a partition's two inputs within one feedback window of each other in event time.

        The fetcher returns whatever bytes arrived, so on a backlog the impressions (KBs each) and
        the feedback (~150 B) of a partition drift apart by hours of event time; every request of
        the gap then waits in the Tables (and the changelog) for feedback that is not read yet. An
        input more than a window ahead is paused while the other has records left to read (what
        Kafka Streams does with timestamps across a task's partitions). An input with records left
        to read is also not idle, whatever the wall clock says.
        """
        behind: dict[tuple[int, str], bool] = {}
        for tp in self.consumer.assignment():
            kind = self.kind_of_topic[tp.topic]
            high = self.consumer.highwater(tp)
            behind[(tp.partition, kind)] = high is None or await self.consumer.position(tp) < high
            if behind[(tp.partition, kind)]:
                self.join.input_behind(tp.partition, kind)
        window, max_ts = self.cfg.feedback_window_s, self.join.max_ts
        pause, resume = [], []
        for partition in self.partitions:
            for kind, other in (("impressions", "feedback"), ("feedback", "impressions")):
                tp = self.input_tps[(partition, kind)]
                if (partition, kind) not in behind:
                    continue
                mine, theirs = max_ts.get((partition, kind)), max_ts.get((partition, other))
                ahead = mine is not None and theirs is not None and mine > theirs + window
                (pause if ahead and behind.get((partition, other)) else resume).append(tp)
        if pause:
            self.consumer.pause(*pause)
        if resume:
            self.consumer.resume(*resume)

    async def finished(self) -> None:
        """Wait for the batch in flight to be committed; re-raise its failure (the worker then exits)."""
        if self._finishing is not None:
            task, self._finishing = self._finishing, None
            await task

    async def _finish(self, batch: Batch, offsets: dict[TopicPartition, int]) -> None:
        """The batch through the one commit path (streaming/commit.py), this worker as its Sink."""
        await commit_batch(self, batch, offsets)

    # ---- the Sink of streaming/commit.py
    async def send_outputs(self, outputs: list[Output]) -> None:
        t0 = time.perf_counter()
        names = self.output_names
        await self._produce_and_wait([(names[o.kind], o.partition, o.key, o.value) for o in outputs])
        self.timing["outputs"] += time.perf_counter() - t0

    async def send_changelog(self, writes: list[StateWrite]) -> None:
        t0 = time.perf_counter()
        names = self.changelog_names
        await self._produce_and_wait([(names[w.table], w.partition, w.key, w.value) for w in writes])
        self.timing["changelog"] += time.perf_counter() - t0

    async def commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        t0 = time.perf_counter()
        await self.consumer.commit(offsets)
        self.timing["commit"] += time.perf_counter() - t0

    async def _produce_and_wait(self, records: list) -> None:
        futures = await send_record_batches(self.producer, records, self.cfg.partitions)
        if futures:
            await asyncio.gather(*futures)   # raises if the broker refused one: no commit, the worker exits

    # ---- tables --------------------------------------------------------------------------------
    async def restore(self, partitions: list[int]) -> None:
        """Fresh state for the assigned partitions: every changelog record, from the beginning."""
        t0 = time.perf_counter()
        for store in self.stores.values():
            store.clear()
        self.join = UserJoin(self.cfg, self.stores)
        self.partitions = partitions
        self.input_tps = {(p, kind): TopicPartition(topic_name(self.cfg, kind), p)
                          for p in partitions for kind in ("impressions", "feedback")}
        n = await read_changelogs(self.cfg, self.stores, partitions)
        self.counts["restored_records"] += n
        for p in partitions:   # register every partition, so a quiet one still closes its windows
            self.join.on_message("ticks", p, None, b"")
        log.info("assigned partitions %s: restored %d changelog records in %.2f s", partitions, n,
                 time.perf_counter() - t0)

    async def _report_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            log.info("join %s | %s | timing %s", self.join.stats, self.counts,
                     {k: round(v, 2) for k, v in self.timing.items()})


async def read_changelogs(cfg: StreamConfig, stores: dict[str, dict[bytes, bytes]], partitions: list[int]) -> int:
    """Replay the changelog partitions into `stores` (a None value deletes); returns the records read.

    Reads each partition to its fetch high watermark (true end offset), not to ListOffsets LATEST.
    """
    if not partitions:
        return 0
    table_of = {changelog_topic(cfg, t): t for t in stores}
    tps = [TopicPartition(topic, p) for topic in table_of for p in partitions]
    consumer = AIOKafkaConsumer(**cfg.client_options(), group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        n, left = 0, set(tps)
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=200, max_records=20_000)
            for tp, records in fetched.items():
                store = stores[table_of[tp.topic]]
                for r in records:
                    if r.value is None:
                        store.pop(r.key, None)
                    else:
                        store[r.key] = r.value
                n += len(records)
            for tp in list(left):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    left.discard(tp)
        return n
    finally:
        await consumer.stop()


def run_worker(cfg: StreamConfig, *, create_topics: bool = True) -> int:
    """Run the batched worker in this process until SIGTERM/SIGINT."""
    if create_topics:
        ensure_topics(cfg)
    check_layout(cfg)   # refuses topics written under another keying, with the way out
    ensure_changelog_topics(cfg, TABLES)

    async def main() -> None:
        # Each batch allocates ~10^5 short-lived containers (records, decoded events, futures); with the
        # default gen-0 threshold (700) the collector then rescans the long-lived state many times
        # per batch. A larger threshold keeps collections rare; reference counting frees the rest.
        gc.set_threshold(100_000, 20, 20)
        worker = BatchJoinWorker(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()
        log.info("stopped: join %s | %s", worker.join.stats, worker.counts)

    asyncio.run(main())
    return 0
