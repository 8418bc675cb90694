"""Serving replicas: constrained beam search with hot-swapped, versioned weights.

Invariants:
- a request runs start to finish on ONE (version, model) snapshot, read once under a lock; a new
  version is built in a model no request is using and then swapped in by one reference
  assignment, so no request ever sees a half-loaded model;
- versions only go forward: `apply_weights` rejects an older or equal version and a checksum
  mismatch with ValueError (loudly, before building any model): a replica never serves
  unverified or half-loaded weights;
- inference never writes parameters or persistent buffers (requests run under
  `torch.inference_mode` on an eval-mode model), which is what lets a CPU replica serve them as
  read-only views of the published buffer (zero-copy, below);
- every answer carries the version that produced it.

Zero-copy serving (CPU): the new version's parameters are views of the packed buffer Ray hands
`apply_weights` (a read-only view of the object store on this node), assigned to a fresh module
built from a storage-less skeleton. Its snapshot holds the buffer, so the object stays pinned
while any request uses that version and is released when the last one finishes. On another
device (CUDA) views of host memory cannot serve, so the weights are copied into an idle model.

Serving dtype (`serve.dtype`, `dtype=`): fp32 serves the published tensors as they are, and only fp32
is zero-copy. bf16, int8 and fp8 versions build their own tensors: each pushed version is first
assembled from views of the buffer (no copy), then `learner.quant.prepare_for_serving` casts it
(bf16: every floating tensor a new one) or quantizes its Linears (int8: per-row dynamic int8; fp8:
bf16 with the wide Linears in fp8, CUDA only), before the swap; that cost is part of
`last_apply_s` (the push time). int8 leaves embeddings and norms as views of the buffer, which the
snapshot then keeps pinned like a zero-copy one. A dtype this machine runs slowly (bf16 without
AVX-512 BF16) still serves, with a warning in the log (`learner.quant.serving_dtype_support`).

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

from actors.publisher import pack_weights, unpack_weights, verify_checksum
from learner.beam import beam_search, sample_from_beam
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.quant import SERVING_DTYPES, prepare_for_serving, serving_dtype_support
from learner.tokenizer import SemanticTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Snapshot:
    version: int
    model: torch.nn.Module
    buffer: object = None    # the packed weights the model's tensors view (zero-copy); None when copied


def storage_less_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and persistent buffers are meta tensors (no memory).

    Copying it is cheap, and `load_state_dict(..., assign=True)` then gives the copy real tensors;
    non-persistent buffers (not in the state dict, e.g. index offsets) are copied with their values.
    """
    placeholders = {}           # deepcopy's memo: id(original tensor) -> what the copy gets instead
    for tensor in model.state_dict(keep_vars=True).values():
        meta = torch.empty_like(tensor, device="meta")
        placeholders[id(tensor)] = (torch.nn.Parameter(meta, requires_grad=False)
                                    if isinstance(tensor, torch.nn.Parameter) else meta)
    return copy.deepcopy(model, memo=placeholders)


class ServingReplica:
    """Holds model + tokenizer + trie; answers `recommend` with the version it used."""

    def __init__(self, model: torch.nn.Module, *, tokenizer: SemanticTokenizer | None = None,
                 model_cfg: ModelConfig | None = None, version: int = 0, device: str = "cpu",
                 zero_copy: bool | None = None, dtype: str = "fp32"):
        """`zero_copy` (default: on the CPU, fp32 only) serves new versions as views of the published
        buffer; `dtype` (serve.dtype) is what every version is served in (`model` is float32)."""
        self.device = torch.device(device)
        if dtype not in SERVING_DTYPES:
            raise ValueError(f"dtype: must be one of {SERVING_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.zero_copy = self.device.type == "cpu" and dtype == "fp32" if zero_copy is None else bool(zero_copy)
        if self.zero_copy and (self.device.type != "cpu" or dtype != "fp32"):
            raise ValueError(f"zero_copy: only fp32 on the CPU serves views of host memory, not {dtype} on {device!r}")
        fast, kind = serving_dtype_support(dtype, self.device)   # raises nothing: fp8 on a CPU fails below
        if not fast and dtype != "fp8":
            log.warning("serve.dtype %s on %s: supported but slow here (fast with %s)", dtype, kind,
                        "AVX-512 BF16 or AMX" if dtype == "bf16" else "AVX-512 VNNI or AMX")
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.trie = tokenizer.trie() if tokenizer is not None else None
        self._fields = {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}
        converting = dtype != "fp32"
        self._skeleton = storage_less_copy(model) if self.zero_copy or converting else None
        model = prepare_for_serving(model, dtype, self.device) if converting else model.to(self.device).eval()
        self._active = _Snapshot(int(version), model)
        self._standby: torch.nn.Module | None = None   # copy path: the previous model, reused when idle
        self._in_use: dict[int, int] = {}          # id(model) -> requests running on it
        self._lock = threading.Lock()              # guards _active, _standby, _in_use
        self._apply_lock = threading.Lock()        # one weight load at a time
        self.applied_at = time.time()
        self.last_apply_s = 0.0                    # verify + build + swap of the last version
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
            left = self._in_use[id(snap.model)] - 1
            if left:
                self._in_use[id(snap.model)] = left
            else:
                del self._in_use[id(snap.model)]

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
            with torch.inference_mode():       # never writes the weights: they may be read-only views
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
        """Verify `weights` (packed safetensors buffer, or a state dict) as `version`, build it, swap.

        Raises ValueError on an older/equal version, a checksum mismatch or weights that do not fit
        the model, before anything is served; returns the version now served.
        """
        version = int(version)
        with self._apply_lock:
            started = time.perf_counter()
            if version <= self._active.version:
                raise ValueError(f"weights version {version} is not newer than the served version "
                                 f"{self._active.version}")
            if isinstance(weights, dict):
                weights = pack_weights(weights)
            try:
                verify_checksum(weights, checksum)
                tensors = self._fitting_tensors(weights)
                if self.dtype != "fp32":
                    model = prepare_for_serving(self._viewing_model(tensors), self.dtype, self.device)
                    snapshot = _Snapshot(version, model, weights)   # int8 may keep views (embeddings)
                elif self.zero_copy:
                    snapshot = _Snapshot(version, self._viewing_model(tensors), weights)
                else:
                    snapshot = _Snapshot(version, self._copied_model(tensors))
            except ValueError as exc:
                raise ValueError(f"weights version {version}: {exc}") from None   # nothing was swapped
            with self._lock:
                old = self._active
                self._active = snapshot                   # the atomic swap
                if not self.zero_copy and self.dtype == "fp32":
                    self._standby = old.model
            # zero-copy: the old version's buffer is released with its last request's snapshot
            self.applied_at = time.time()
            self.last_apply_s = time.perf_counter() - started
            return version

    def _fitting_tensors(self, weights) -> dict[str, torch.Tensor]:
        """Views of the packed tensors, checked against the model's names, shapes and dtypes."""
        tensors = unpack_weights(weights)
        missing, unexpected = sorted(set(self._fields) - set(tensors)), sorted(set(tensors) - set(self._fields))
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, t in tensors.items():
            shape, dtype = self._fields[name]
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(f"weights tensor {name!r}: {t.dtype} {tuple(t.shape)} != model's {dtype} {tuple(shape)}")
        return tensors

    def _viewing_model(self, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A fresh module whose parameters and persistent buffers ARE `tensors` (no copy)."""
        model = copy.deepcopy(self._skeleton)
        model.load_state_dict(tensors, strict=True, assign=True)
        return model.eval()

    def _copied_model(self, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """`tensors` copied into an idle model on the replica's device (host -> device on CUDA)."""
        target = self._take_standby()
        targets = target.state_dict()
        with torch.no_grad():
            for name, t in tensors.items():
                targets[name].copy_(t)
        return target.eval()

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
        return {"version": self.version, "applied_at": self.applied_at, "requests_served": self.requests_served,
                "last_apply_s": self.last_apply_s, "zero_copy": self.zero_copy, "dtype": self.dtype}


class _ReplicaCalls:
    """What the WeightPublisher and the supervisor call on any replica actor (`self.replica` is its ServingReplica)."""

    replica: ServingReplica

    def apply_weights(self, version: int, weights: np.ndarray, checksum: int) -> int:
        return self.replica.apply_weights(version, weights, checksum)

    def version(self) -> int:
        return self.replica.version

    def health(self) -> dict:
        return self.replica.health()


@ray.remote(max_concurrency=4)
class ReplicaActor(_ReplicaCalls):
    """Ray wrapper: builds the model once from a config, a tokenizer and a published version."""

    def __init__(self, model_cfg: ModelConfig, tokenizer_bytes: bytes, version: int, weights: np.ndarray,
                 checksum: int, *, device: str = "cpu", torch_threads: int = 1, dtype: str = "fp32"):
        torch.set_num_threads(torch_threads)
        tokenizer = SemanticTokenizer.load(io.BytesIO(tokenizer_bytes))
        self.replica = ServingReplica(LazyDecoder(model_cfg), tokenizer=tokenizer, model_cfg=model_cfg,
                                      version=0, device=device, dtype=dtype)
        self.replica.apply_weights(version, weights, checksum)

    def recommend(self, contexts: list[dict], top_k: int, beam_width: int, temperature: float = 0.0) -> dict:
        return self.replica.recommend(contexts, top_k=top_k, beam_width=beam_width, temperature=temperature)


@ray.remote(max_concurrency=4)
class WeightsOnlyReplicaActor(_ReplicaCalls):
    """A replica without search (bench/weights.py): same apply path, any nn.Module factory."""

    def __init__(self, model_factory, *, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.replica = ServingReplica(model_factory(), version=0)

