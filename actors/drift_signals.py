"""The drift monitor's estimators: KL(pi_old || pi_new) from served samples, and collapse signals.

Invariant: pure functions of arrays plus one bounded buffer (`ServedSampleBuffer`, at most
`per_version` samples for at most `max_versions` versions); no I/O, no Ray. actors/drift.py
decides what alerts; this module only measures.

KL from the served samples (the estimators used for KL control in RL fine-tuning): the items
served by version `old` are draws x ~ pi_old whose log pi_old(x) the impression logged (beam.py:
the sum of the unconstrained per-level log-softmax). Score each with the new version's model on
the sample's own context (log pi_new(x), `LazyDecoder.item_logprob`, teacher-forced) and let
log r = log pi_new(x) - log pi_old(x). Then
    k1 = -log r                 E_{x~pi_old}[k1] = KL(pi_old || pi_new)   (unbiased; one sample can be < 0)
    k3 = (r - 1) - log r        E_{x~pi_old}[r - 1] = 0, so also unbiased, and every term is >= 0
                                (x - 1 >= log x), with a lower variance than k1 when pi_new ~ pi_old.
What the replicas serve are top-k draws without replacement from pi restricted to the beam
(learner/beam.py `sample_from_beam`): x ~ q = pi_old / Z on the beam, not i.i.d. x ~ pi_old. Then
E_q[k1] = KL(q || pi_new) - KL(q || pi_old) exactly (log Z cancels): how much less likely the new policy
makes what the old one served; but E_q[r] = (pi_new's beam mass) / Z != 1, so k3 loses its zero-mean
term and grows with the new policy's mass on the served items (a policy trained on them raises it). With quantized serving (serve.dtype) the
logged log pi_old is the quantized model's; the monitor scores in fp32, so a version compared with
itself reads the quantization error (small: see tests/test_replica.py agreement).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

LOG_RATIO_CLIP = 30.0     # |log r| beyond this is clipped so exp() stays finite (k3 is then huge anyway)


def kl_estimators(logp_old, logp_new) -> dict:
    """Per-sample log pi_old(x), log pi_new(x) for x ~ pi_old -> {"k1", "k3", "n"} (means, nats)."""
    old = np.asarray(logp_old, dtype=np.float64).reshape(-1)
    new = np.asarray(logp_new, dtype=np.float64).reshape(-1)
    if old.shape != new.shape:
        raise ValueError(f"logp_old and logp_new must have the same length, got {old.shape} and {new.shape}")
    if len(old) == 0:
        raise ValueError("logp_old: need at least one sample")
    if not (np.isfinite(old).all() and np.isfinite(new).all()):
        raise ValueError("logp_old and logp_new must be finite log-probabilities")
    log_r = np.clip(new - old, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    k1 = -log_r
    k3 = np.expm1(log_r) - log_r
    return {"k1": float(k1.mean()), "k3": float(k3.mean()), "n": int(len(old))}


def top_item_share(request_ids, item_ids, logprobs, top_n: int) -> float | None:
    """Share of requests whose top item (highest logged logprob among its served items; the first
    one when none is logged) is one of the `top_n` items most served in these samples.
    A spread policy scores about top_n / distinct-top-items; a collapsed one 1.0. None: no samples."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    items = np.asarray(item_ids, dtype=np.int64)
    if len(items) == 0:
        return None
    if not len(request_ids) == len(items) == len(logprobs):
        raise ValueError("request_ids, item_ids and logprobs must have the same length")
    values, counts = np.unique(items, return_counts=True)
    most_served = set(values[np.argsort(-counts, kind="stable")[:top_n]].tolist())
    best: dict = {}                                    # request id -> (logprob, item)
    for rid, item, lp in zip(request_ids, items.tolist(), logprobs):
        score = -np.inf if lp is None else float(lp)
        if rid not in best or score > best[rid][0]:
            best[rid] = (score, item)
    return float(np.mean([item in most_served for _, item in best.values()]))


class ServedSampleBuffer:
    """The served samples usable for KL estimates: source "onerec" with a logged logprob and a
    semantic id; up to `per_version` (the first ones) for each of the `max_versions` newest versions."""

    def __init__(self, per_version: int, max_versions: int):
        if per_version < 1 or max_versions < 1:
            raise ValueError(f"per_version and max_versions must be >= 1, got {per_version}, {max_versions}")
        self.per_version, self.max_versions = per_version, max_versions
        self._by_version: OrderedDict[int, list[dict]] = OrderedDict()

    def add(self, sample: dict) -> None:
        if sample.get("logprob") is None or sample.get("semantic_id") is None or not sample.get("context"):
            return                                     # legacy traffic: not drawn from any version
        version = int(sample["model_version"])
        kept = self._by_version.get(version)
        if kept is None:
            if self._by_version and version < min(self._by_version) and len(self._by_version) >= self.max_versions:
                return
            kept = self._by_version[version] = []
            for old in sorted(self._by_version)[:-self.max_versions]:
                del self._by_version[old]
        if len(kept) < self.per_version:
            kept.append({"context": sample["context"], "semantic_id": list(sample["semantic_id"]),
                         "logprob": float(sample["logprob"])})

    def samples(self, version: int) -> list[dict]:
        return list(self._by_version.get(int(version), ()))

    def count(self, version: int) -> int:
        return len(self._by_version.get(int(version), ()))

    def versions(self) -> list[int]:
        return sorted(self._by_version)


@torch.no_grad()
def score_logprobs(model, samples: list[dict], tokenizer, model_cfg, *, batch: int, device) -> np.ndarray:
    """log pi_model(x | context) of each sample's served item, `batch` contexts per forward -> (N,)."""
    from learner.features import build_context_batch

    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        ctx = build_context_batch([s["context"] for s in chunk], tokenizer, model_cfg).to(device)
        sids = torch.tensor([s["semantic_id"] for s in chunk], dtype=torch.long, device=device)   # (b, 3)
        out.append(model.item_logprob(ctx, sids).float().cpu().numpy())                          # (b,)
    return np.concatenate(out) if out else np.zeros(0)
