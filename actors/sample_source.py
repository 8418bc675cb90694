"""The sample source: Kafka `samples` in, decoded and deduplicated samples out, offsets committed on request.

Invariants:
- offsets are committed only by `commit()`, which the learner calls after the step that used the
  records (so a crash re-delivers exactly what no step has trained);
- a sample is identified by (request_id, item_id); redeliveries within the remembered window
  (`SEEN_KEYS`, checkpointed by the learner through `seen_keys()`) are skipped;
- a bad record is counted and skipped (its offset still advances): it never stops the loop;
- with `arm` set, samples of other A/B arms are skipped (counted as `other_arm`): an arm's learner
  trains only on its own arm's samples. Legacy traffic carries no arm and reaches every learner.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Iterable

from streaming import schemas
from streaming.topics import topic_name

log = logging.getLogger(__name__)

SEEN_KEYS = 200_000          # sample ids remembered for dedupe (hashed, checkpointed)


def key_hash(request_id: str, item_id: int) -> int:
    """A sample id as a signed 64-bit int (checkpointable as a tensor)."""
    digest = hashlib.blake2b(f"{request_id}\x00{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class SampleSource:
    """One consumer over every partition of `samples` (manual assignment; the group id holds offsets)."""

    def __init__(self, stream_cfg, *, group_id: str, max_records: int, max_wait_s: float,
                 positions: dict[int, int] | None = None, seen: Iterable[int] = (), arm: str | None = None,
                 client_id: str | None = None):
        self.stream_cfg = stream_cfg
        self.topic = topic_name(stream_cfg, "samples")
        self.group_id = group_id
        self.max_records, self.max_wait_s = max_records, max_wait_s
        self.arm = arm
        self.stats = collections.Counter()      # records, bad, duplicates, other_arm
        self.seen: collections.OrderedDict[int, None] = collections.OrderedDict((int(k), None) for k in seen)
        self.positions: dict[int, int] = dict(positions or {})   # committed: what checkpoints hold
        self._polled: dict[int, int] = {}                          # read, not yet committed
        self.consumer = self._connect(client_id or f"{stream_cfg.namespace}-learner")

    def _connect(self, client_id: str):
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(group_id=self.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id=client_id, max_poll_records=self.max_records,
                                 **self.stream_cfg.client_options())
        deadline = time.monotonic() + 30.0
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            if time.monotonic() > deadline:
                consumer.close()
                raise RuntimeError(f"topic {self.topic!r} has no partitions (run `onerec topics` first)")
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        self.consumer = consumer
        if self.positions:
            # Resuming: the checkpoint's positions become the group's committed offsets (the consumer
            # would otherwise reset to the crashed process's later commits), then seek to them. A
            # partition the checkpoint does not know (added since) starts at its beginning.
            for tp in tps:
                if tp.partition not in self.positions:
                    consumer.seek_to_beginning(tp)
                    self.positions[tp.partition] = consumer.position(tp)
            self.commit()
            for tp in tps:
                consumer.seek(tp, self.positions[tp.partition])
        else:
            # Fresh start: the group's committed offsets (or the beginning); recorded for checkpoints.
            self.positions = {tp.partition: consumer.position(tp) for tp in tps}
        return consumer

    def poll(self) -> tuple[int, list[dict]]:
        """(records read, new valid samples of this arm): up to `max_records`, waiting at most `max_wait_s`."""
        records: list = []
        deadline = time.monotonic() + self.max_wait_s
        while len(records) < self.max_records:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = self.consumer.poll(timeout_ms=max(1, int(left * 1000)),
                                        max_records=self.max_records - len(records))
            for batch in polled.values():
                records.extend(batch)
        samples = self._decode(records)
        for record in records:
            self._polled[record.partition] = max(self._polled.get(record.partition, 0), record.offset + 1)
        self.stats["records"] += len(records)
        return len(records), samples

    def _decode(self, records: list) -> list[dict]:
        samples = []
        for record in records:
            try:
                sample = schemas.decode_sample(record.value)
            except schemas.SchemaError as exc:
                self.stats["bad"] += 1
                log.warning("samples[%d]@%d skipped: %s", record.partition, record.offset, exc.reason)
                continue
            if self.arm is not None and sample.get("arm") not in (None, self.arm):
                self.stats["other_arm"] += 1
                continue
            key = key_hash(sample["request_id"], sample["item_id"])
            if key in self.seen:
                self.stats["duplicates"] += 1
                continue
            self.seen[key] = None
            if len(self.seen) > SEEN_KEYS:
                self.seen.popitem(last=False)
            samples.append(sample)
        return samples

    def commit(self) -> None:
        """Commit the positions of everything polled so far (call after the step that used it)."""
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        for partition, offset in self._polled.items():
            self.positions[partition] = max(self.positions.get(partition, 0), offset)
        self._polled.clear()
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in self.positions.items()}
        if offsets:
            self.consumer.commit(offsets)

    def seen_keys(self) -> list[int]:
        return list(self.seen)

    def end_offsets(self) -> dict[int, int]:
        from kafka import TopicPartition

        tps = [TopicPartition(self.topic, p) for p in self.positions]
        return {tp.partition: o for tp, o in self.consumer.end_offsets(tps).items()}

    def close(self) -> None:
        self.consumer.close()
