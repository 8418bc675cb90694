"""A pool of serving replicas: round robin over live handles, a dead or slow one skipped and retried elsewhere.

Invariant: a request fails only when no replica can answer it; each replica is tried at most once
per request; a replica that died is dropped from the pool (the driver replaces it).
"""
from __future__ import annotations

import asyncio
import itertools
import logging

from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)


class NoReplicaError(RuntimeError):
    """No replica could answer (all dead or timing out)."""


class ReplicaPool:
    """Round robin over live replica handles; dead ones are dropped and can be replaced."""

    def __init__(self, handles=()):
        self._handles: list = list(handles)
        self._counter = itertools.count()
        self.failures = 0

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def handles(self) -> list:
        return list(self._handles)

    def add(self, handle) -> None:
        self._handles.append(handle)

    def remove(self, handle) -> None:
        self._handles = [h for h in self._handles if h._actor_id != handle._actor_id]

    def order(self) -> list:
        """All live replicas, starting at the next one in round-robin order."""
        handles = self._handles
        if not handles:
            return []
        start = next(self._counter) % len(handles)
        return handles[start:] + handles[:start]

    async def recommend(self, contexts: list[dict], *, top_k: int, beam_width: int, timeout_s: float,
                        temperature: float = 0.0) -> dict:
        """One replica call, retried on the next replica when one dies or times out."""
        errors = []
        for handle in self.order():
            try:
                return await asyncio.wait_for(handle.recommend.remote(contexts, top_k, beam_width, temperature), timeout_s)
            except RayActorError as exc:   # died (or unreachable): drop it; the driver replaces it
                self.failures += 1
                self.remove(handle)
                errors.append(f"replica died: {type(exc).__name__}")
                log.warning("replica %s died; retrying on another: %s", handle._actor_id.hex()[:8], exc)
            except (asyncio.TimeoutError, GetTimeoutError):
                self.failures += 1
                errors.append(f"replica timed out after {timeout_s} s")
                log.warning("replica %s timed out; retrying on another", handle._actor_id.hex()[:8])
        raise NoReplicaError("; ".join(errors) or "no serving replica is running")
