"""The one commit path of both join engines: outputs acknowledged, then the changelog, then the offsets.

Invariant: nothing of a batch is marked done before what it produced is durable. `commit_batch` runs
the three steps in this order, each awaited before the next:
  1. the batch's outputs (samples, dead letters) are produced and acknowledged;
  2. then its state changes (`StateWrite`s) go to the changelog topics;
  3. then the input offsets the batch covers are committed.
A crash before 2 replays the batch on restart against the state of before the batch (restored from
the changelogs) and re-emits identical records (consumers dedupe by `(request_id, item_id)`); a crash
between 2 and 3 replays it against its own state, which drops every input as a duplicate.

Each engine supplies a `Sink`: streaming/batch_worker.py produces record batches with aiokafka and
commits its consumer's offsets; streaming/app.py sends through Faust topics and Tables, and Faust
commits the offsets of the events its agents acknowledged after flushing its producer (so its step 3
is Faust's own, after this function returns).
"""
from __future__ import annotations

from typing import Protocol

from streaming.join import Batch, Output, StateWrite


class Sink(Protocol):
    async def send_outputs(self, outputs: list[Output]) -> None:
        """Produce the records and return once the broker acknowledged every one (raise otherwise)."""

    async def send_changelog(self, writes: list[StateWrite]) -> None:
        """Produce the state changes to the Tables' changelogs, partition `write.partition`."""

    async def commit_offsets(self, offsets: dict) -> None:
        """Commit the input offsets the batch covers."""


async def commit_batch(sink: Sink, batch: Batch, offsets: dict) -> None:
    """The module invariant's three steps, in order."""
    if batch.outputs:
        await sink.send_outputs(batch.outputs)
    if batch.writes:
        await sink.send_changelog(list(batch.writes.values()))
    if offsets:
        await sink.commit_offsets(offsets)
