"""Serving replicas: constrained beam search with hot-swapped, versioned weights.

Invariants:
- a request runs start to finish on ONE (version, model) snapshot, read once under a lock; a new
  version is loaded into a model no request is using and then swapped in by one reference
  assignment, so no request ever sees a half-loaded model;
- versions only go forward: `apply_weights` rejects an older or equal version and a checksum
  mismatch with ValueError (loudly, before touching any model);
- every answer carries the version that produced it.

`ServingReplica` is the plain class (tested in-process); `ReplicaActor` is its thin Ray wrapper,
a threaded actor so a weight load runs beside requests instead of stalling them.
"""
from __future__ import annotations

import copy
import io
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from actors.publisher import load_checked, pack_weights
from learner.beam import beam_search, sample_from_beam
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.tokenizer import SemanticTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Snapshot:
    version: int
    model: torch.nn.Module


class ServingReplica:
    """Holds model + tokenizer + trie; answers `recommend` with the version it used."""

    def __init__(self, model: torch.nn.Module, *, tokenizer: SemanticTokenizer | None = None,
                 model_cfg: ModelConfig | None = None, version: int = 0, device: str = "cpu"):
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.trie = tokenizer.trie() if tokenizer is not None else None
        self._active = _Snapshot(int(version), model.to(self.device).eval())
        self._standby: torch.nn.Module | None = None
        self._in_use: dict[int, int] = {}          # id(model) -> requests running on it
        self._lock = threading.Lock()              # guards _active, _standby, _in_use
        self._apply_lock = threading.Lock()        # one weight load at a time
        self.applied_at = time.time()
        self.requests_served = 0

    @property
    def version(self) -> int:
        return self._active.version

    # ---- serving -------------------------------------------------------------------------------
    def _acquire(self) -> _Snapshot:
        with self._lock:
            snap = self._active
            self._in_use[id(snap.model)] = self._in_use.get(id(snap.model), 0) + 1
            return snap

    def _release(self, snap: _Snapshot) -> None:
        with self._lock:
            self._in_use[id(snap.model)] -= 1

    def recommend(self, contexts: list[dict], *, top_k: int, beam_width: int, temperature: float = 0.0) -> dict:
        """Top-k items per context by constrained beam search over the tokenizer's trie.

        temperature 0 serves the beam's greedy top-k; above 0 the k items are sampled without
        replacement from the beam's candidates (`learner.beam.sample_from_beam`), so exposures are
        draws from the policy, as GBPO assumes. Returns {item_ids (B, k), semantic_ids (B, k, 3), logprobs (B, k), model_version} as lists;
        logprobs are log pi_old of generating each item (what the impression logs for GBPO).
        """
        if self.tokenizer is None or self.model_cfg is None:
            raise ValueError("this replica has no tokenizer/model config: it only holds weights")
        if not contexts:
            raise ValueError("contexts: empty batch")
        if not 1 <= top_k <= beam_width:
            raise ValueError(f"top_k must be in [1, beam_width={beam_width}], got {top_k}")
        ctx = build_context_batch(contexts, self.tokenizer, self.model_cfg).to(self.device)
        snap = self._acquire()
        try:
            with torch.inference_mode():
                recs = beam_search(snap.model, ctx, self.trie, beam_width=beam_width,
                                   top_k=beam_width if temperature > 0 else top_k)
            if temperature > 0:
                recs = sample_from_beam(recs, top_k=top_k, temperature=temperature)
        finally:
            self._release(snap)
        self.requests_served += len(contexts)
        return {"item_ids": recs.item_ids.cpu().tolist(),
                "semantic_ids": recs.semantic_ids.cpu().tolist(),
                "logprobs": recs.logprobs.float().cpu().tolist(),
                "model_version": snap.version}

    # ---- weights -------------------------------------------------------------------------------
    def apply_weights(self, version: int, weights: np.ndarray | bytes | dict, checksum: int) -> int:
        """Load `weights` (packed safetensors buffer, or a state dict) as `version`, then swap.

        Raises ValueError on an older/equal version or a checksum mismatch; returns the version now served.
        """
        version = int(version)
        with self._apply_lock:
            if version <= self._active.version:
                raise ValueError(f"weights version {version} is not newer than the served version "
                                 f"{self._active.version}")
            if isinstance(weights, dict):
                weights = pack_weights(weights)
            target = self._take_standby()
            try:
                load_checked(target, weights, checksum)    # copies out of the (read-only) buffer
            except ValueError as exc:
                raise ValueError(f"weights version {version}: {exc}") from None   # target is dropped
            target.eval()
            with self._lock:
                old = self._active
                self._active = _Snapshot(version, target)  # the atomic swap
                self._standby = old.model
            self.applied_at = time.time()
            return version

    def _take_standby(self) -> torch.nn.Module:
        """A model no request is using: the previous one if idle, else a fresh copy."""
        with self._lock:
            standby = self._standby
            if standby is not None and self._in_use.get(id(standby), 0) == 0:
                self._standby = None
                return standby
            active = self._active.model
        return copy.deepcopy(active)

    def health(self) -> dict:
        return {"version": self.version, "applied_at": self.applied_at, "requests_served": self.requests_served}


@ray.remote(max_concurrency=4)
class ReplicaActor:
    """Ray wrapper: builds the model once from a config, a tokenizer and a published version."""

    def __init__(self, model_cfg: ModelConfig, tokenizer_bytes: bytes, version: int, weights: np.ndarray,
                 checksum: int, *, device: str = "cpu", torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        tokenizer = SemanticTokenizer.load(io.BytesIO(tokenizer_bytes))
        self.replica = ServingReplica(LazyDecoder(model_cfg), tokenizer=tokenizer, model_cfg=model_cfg,
                                      version=0, device=device)
        self.replica.apply_weights(version, weights, checksum)

    def recommend(self, contexts: list[dict], top_k: int, beam_width: int, temperature: float = 0.0) -> dict:
        return self.replica.recommend(contexts, top_k=top_k, beam_width=beam_width, temperature=temperature)

    def apply_weights(self, version: int, weights: np.ndarray, checksum: int) -> int:
        return self.replica.apply_weights(version, weights, checksum)

    def version(self) -> int:
        return self.replica.version

    def health(self) -> dict:
        return self.replica.health()


@ray.remote(max_concurrency=4)
class WeightsOnlyReplicaActor:
    """A replica without search (bench/weights.py): same apply path, any nn.Module factory."""

    def __init__(self, model_factory, *, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.replica = ServingReplica(model_factory(), version=0)

    def apply_weights(self, version: int, weights: np.ndarray, checksum: int) -> int:
        return self.replica.apply_weights(version, weights, checksum)

    def version(self) -> int:
        return self.replica.version
