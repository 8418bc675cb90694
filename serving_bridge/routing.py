"""Routing requests to the replicas of a user's A/B arm, in batches.

Invariants:
- a user's requests always go to the replicas of `streaming.arms.arm_of(user, arms)`: the same arm
  in every process and after every restart; a user in an arm this bridge does not serve (a fixed
  arm such as `oracle`, served by its own pipeline) gets `ArmNotServed`, which the HTTP layer turns
  into a 409 naming the arm;
- batching never mixes arms and never changes an answer: requests that arrive within `batch_wait_s`
  of each other with the same `top_k` share one replica call (one beam search over a batch of
  contexts), and each gets back exactly its own row, with the batch's version; a batch that fails
  on its content (a context the featurizer refuses) is answered request by request, so one bad
  request never fails the good ones beside it.

Why batch: a replica call costs a Ray round trip plus one beam search; on 2 cores, under A/B traffic
(several arms, each with its own replicas and learner), one call per request is what limits the
request rate. A batch of B contexts costs far less than B calls.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

from serving_bridge.pool import NoReplicaError, ReplicaPool
from streaming.arms import arm_of


class ArmNotServed(LookupError):
    """The user's arm has no replicas behind this bridge."""


class BatchingPool:
    """Collects requests for one arm and sends them to its `ReplicaPool` in batches."""

    def __init__(self, pool: ReplicaPool, *, beam_width: int, temperature: float, timeout_s: float,
                 batch_wait_s: float, max_batch: int):
        self.pool = pool
        self.beam_width, self.temperature, self.timeout_s = beam_width, temperature, timeout_s
        self.batch_wait_s, self.max_batch = batch_wait_s, max_batch
        self._waiting: dict[int, list[tuple[dict, asyncio.Future]]] = {}   # top_k -> queued requests
        self._flushers: dict[int, asyncio.Task] = {}
        self.calls = 0
        self.batched_requests = 0

    async def recommend(self, context: dict, top_k: int) -> dict:
        """One row of a replica answer: {model_version, item_ids, semantic_ids, logprobs} for `context`."""
        future = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(top_k, [])
        queue.append((context, future))
        if len(queue) >= self.max_batch:
            self._flush(top_k)
        elif top_k not in self._flushers:
            self._flushers[top_k] = asyncio.create_task(self._flush_later(top_k))
        return await future

    async def _flush_later(self, top_k: int) -> None:
        await asyncio.sleep(self.batch_wait_s)
        self._flushers.pop(top_k, None)
        self._flush(top_k)

    def _flush(self, top_k: int) -> None:
        batch = self._waiting.pop(top_k, [])
        flusher = self._flushers.pop(top_k, None)
        if flusher is not None and flusher is not asyncio.current_task():
            flusher.cancel()
        if batch:
            asyncio.create_task(self._call(top_k, batch))

    async def _call(self, top_k: int, batch: list[tuple[dict, asyncio.Future]]) -> None:
        self.calls += 1
        self.batched_requests += len(batch)
        try:
            served = await self.pool.recommend([c for c, _ in batch], top_k=top_k, beam_width=self.beam_width,
                                               timeout_s=self.timeout_s, temperature=self.temperature)
        except NoReplicaError as exc:   # nothing can answer: every waiting request gets that
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. one context the featurizer refuses
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            for one in batch:       # one bad request must not fail the good ones: answer each alone
                await self._call(top_k, [one])
            return
        for row, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result({"model_version": served["model_version"],
                                   "item_ids": [served["item_ids"][row]],
                                   "semantic_ids": [served["semantic_ids"][row]],
                                   "logprobs": [served["logprobs"][row]]})


class ArmRouter:
    """The experiment's arms (all of them, in their defining order) and the pools of those served here."""

    def __init__(self, arms: Sequence[str], pools: dict[str, BatchingPool]):
        unknown = sorted(set(pools) - set(arms))
        if unknown:
            raise ValueError(f"replica pools for arms {unknown} that are not in the experiment's arms {list(arms)}")
        self.arms = list(arms)
        self.pools = pools

    def arm_for(self, user_id: int) -> str:
        return self.arms[0] if len(self.arms) == 1 else arm_of(user_id, self.arms)

    async def recommend(self, user_id: int, context: dict, top_k: int) -> tuple[str, dict]:
        arm = self.arm_for(user_id)
        pool = self.pools.get(arm)
        if pool is None:
            raise ArmNotServed(f"user {user_id} is in arm {arm!r}, which this bridge does not serve "
                               f"(served: {sorted(self.pools)})")
        return arm, await pool.recommend(context, top_k)
