"""Small clients of the stream for the other packages, the tests and the benchmark.

Invariant: every client here talks the Kafka protocol with `StreamConfig.client_options()` (so
SASL/SSL settings reach it) and never relies on end offsets (the embedded broker's ListOffsets
LATEST can be short): readers start from the beginning or from committed offsets and poll.

- `EventPublisher`: impressions and feedback, validated and keyed by user id (`streaming.join.user_key`).
- `read_events(cfg, kind, ...)`: read a topic from the beginning until a condition or a timeout.
- `WorkerProcess`: `python -m onerec.cli worker` (either engine) as a subprocess (tests, benchmark, `onerec run`).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from streaming import schemas
from streaming.config import StreamConfig
from streaming.partitioner import default_partitions
from streaming.topics import topic_name


class EventPublisher:
    """Produces impressions and feedback (validated, keyed by the user id as decimal ASCII bytes, placed by
    Kafka's default murmur2 partitioner: the contract of topic layout 2) with kafka-python."""

    def __init__(self, cfg: StreamConfig, **producer_options):
        from kafka import KafkaProducer

        self.cfg = cfg
        options = dict(acks="all", linger_ms=5, batch_size=256 * 1024, max_in_flight_requests_per_connection=5)
        options.update(producer_options)
        self.producer = KafkaProducer(**cfg.client_options(), **options)
        self.topics = {k: topic_name(cfg, k) for k in ("impressions", "feedback")}

    def impression(self, event: schemas.Impression):
        return self.send_raw("impressions", str(event["user_id"]).encode(), schemas.encode_impression(event))

    def feedback(self, event: schemas.Feedback):
        return self.send_raw("feedback", str(event["user_id"]).encode(), schemas.encode_feedback(event))

    def send_raw(self, kind: str, key: bytes | None, value: bytes):
        """Unvalidated bytes (tests of the dead-letter path use it too)."""
        return self.producer.send(self.topics[kind], key=key, value=value)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self.producer.close(timeout=10)

    def __enter__(self) -> "EventPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def send_record_batches(producer, records: list[tuple[str, int | None, bytes, bytes | None]],
                              partitions: int) -> list:
    """Queue (topic, partition or None = by key, key, value) records on an AIOKafkaProducer as whole
    record batches per topic partition; return their delivery futures.

    Per-message `send` costs ~100 us of Python per record, more than the join itself. A record
    without a partition lands where the default partitioner would put it
    (`streaming.partitioner.default_partitions`, hashed for the whole call at once; every topic has
    `partitions` partitions), so per-key order and co-partitioning are unchanged; order within each
    partition is kept.
    """
    by_key = iter(default_partitions([key for _, partition, key, _ in records if partition is None], partitions))
    by_partition: dict[tuple[str, int], list] = {}
    for topic, partition, key, value in records:
        if partition is None:
            partition = next(by_key)
        by_partition.setdefault((topic, partition), []).append((key, value))
    futures = []
    for (topic, partition), messages in by_partition.items():
        builder = producer.create_batch()
        for key, value in messages:
            if builder.append(key=key, value=value, timestamp=None) is None:   # full: send, start another
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builder = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a record batch "
                                     f"(producer max_batch_size) for topic {topic}")
        futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


def read_events(cfg: StreamConfig, kind: str, *, until: Callable[[list], bool] | None = None,
                timeout_s: float = 30.0, idle_s: float | None = None) -> list:
    """Records (kafka-python ConsumerRecord) of one topic from the beginning, all partitions.

    Stops when `until(records)` is true, after `idle_s` without a new record (if given), or at
    `timeout_s`.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**cfg.client_options(), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        name = topic_name(cfg, kind)
        consumer.assign([TopicPartition(name, p) for p in range(cfg.partitions)])
        consumer.seek_to_beginning()
        records: list = []
        start = last_new = time.monotonic()
        while time.monotonic() - start < timeout_s:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
                last_new = time.monotonic()
            if until is not None and until(records):
                break
            if idle_s is not None and time.monotonic() - last_new > idle_s:
                break
        return records
    finally:
        consumer.close()


def stream_overrides(cfg: StreamConfig) -> list[str]:
    """`--set stream.k=v` arguments reproducing cfg in a subprocess (None values are left out)."""
    args = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, str):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        args += ["--set", f"stream.{f.name}={value}"]
    return args


class WorkerProcess:
    """The join worker (`stream.engine`) in a subprocess, with its log in a file (dumped by tests on failure)."""

    def __init__(self, cfg: StreamConfig, *, log_path: str | Path | None = None, loglevel: str = "info"):
        self.cfg = cfg
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="onerec-worker-")) / "worker.log"
        self.loglevel = loglevel
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        # the `onerec worker` command (by module name: the config is composed on the top floor, in onerec/)
        cmd = [sys.executable, "-m", "onerec.cli", "worker", "--loglevel", self.loglevel, "--no-create-topics",
               *stream_overrides(self.cfg)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=str(root), env=env)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self, limit: int = 20_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no worker log)"

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown work at all."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
