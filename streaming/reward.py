"""Duration-aware reward shaping (report section 3.1.1): buckets, engagement score q, advantages A.

Invariant: pure functions; numpy arrays in give numpy arrays out, torch tensors in give torch tensors
out (same device), and the two agree exactly. Nothing here reads state: the per-user history lives in
the join (streaming/history.py), which computes `engagement_score` on the user's own play times of the
sample's duration bucket.

    F(d)  = floor(log_beta(d + eps))                                   (bucket, section 3.1.1)
    q_i   = |{p_j in P_{u,b} : p_j <= p_i}| / |P_{u,b}|                 (percentile rank)
    A_i   = +1 if q_i > tau_B and not disliked, -1 if disliked, else 0  (tau_B: top-quartile threshold)
"""
from __future__ import annotations

import math

import numpy as np
import torch

# q of a play time when the user has no history in that bucket: no evidence either way, so the
# middle of the percentile range. It is never > tau_B of a batch made only of such samples.
EMPTY_HISTORY_SCORE = 0.5


def duration_bucket(duration_s, beta: float, eps: float = 1e-6):
    """F(d) = floor(log_beta(d + eps)) elementwise, as int64 (numpy) / long (torch)."""
    if not beta > 1:
        raise ValueError(f"beta must be > 1, got {beta!r}")
    if isinstance(duration_s, torch.Tensor):
        d = duration_s.to(torch.float64)
        if bool((d < 0).any()):
            raise ValueError("duration_s must be >= 0")
        return torch.floor(torch.log(d + eps) / math.log(beta)).to(torch.long)
    d = np.asarray(duration_s, dtype=np.float64)
    if (d < 0).any():
        raise ValueError("duration_s must be >= 0")
    return np.floor(np.log(d + eps) / math.log(beta)).astype(np.int64)


def engagement_score(history_play_times, play_time):
    """q = share of the user's play times (same bucket) that are <= play_time; EMPTY_HISTORY_SCORE if none.

    `play_time` may be a scalar or an array (each element scored against the same history);
    the result has play_time's shape, float64 (numpy) or the history's float dtype (torch).
    """
    if isinstance(history_play_times, torch.Tensor) or isinstance(play_time, torch.Tensor):
        hist = torch.as_tensor(history_play_times).reshape(-1)
        play = torch.as_tensor(play_time, device=hist.device)
        dtype = hist.dtype if hist.is_floating_point() else torch.float64
        if hist.numel() == 0:
            return torch.full(play.shape, EMPTY_HISTORY_SCORE, dtype=dtype, device=hist.device)
        counts = (hist.to(dtype).unsqueeze(0) <= play.to(dtype).reshape(-1, 1)).sum(dim=1)  # (N,)
        return (counts.to(dtype) / hist.numel()).reshape(play.shape)
    hist = np.asarray(history_play_times, dtype=np.float64).reshape(-1)
    play = np.asarray(play_time, dtype=np.float64)
    if hist.size == 0:
        out = np.full(play.shape, EMPTY_HISTORY_SCORE, dtype=np.float64)
    else:
        # searchsorted on the sorted history counts the p_j <= p_i in O(log n) each
        out = np.searchsorted(np.sort(hist), play, side="right") / hist.size
    return out if out.shape else np.float64(out)


def advantages(q, dislike, top_fraction: float = 0.25, tau: float | None = None):
    """A = +1 where q > tau_B and not disliked, -1 where disliked, 0 elsewhere (no normalization).

    tau_B = `tau` when given (the learner's rolling window, `tau_threshold`), else
    quantile(q, 1 - top_fraction) over these q, linear interpolation (numpy's default).
    Ties: q == tau_B is NOT positive (the report's strict >). q is a percentile rank over a short
    history, so many samples share q = 1; counting ties would make the "top quartile" as large as
    the tie mass (every sample when all q are 1), while the strict rule keeps positives at most
    `top_fraction` of the q tau_B was taken over. A single q with no window is its own tau: 0 positives.
    q must be finite: samples without feedback have no q and must be filtered out by the caller.
    """
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction!r}")
    if tau is not None and not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau!r}")
    if isinstance(q, torch.Tensor):
        q_t = q.reshape(-1)
        dis = torch.as_tensor(dislike, device=q.device).reshape(-1).to(torch.bool)
        if q_t.numel() == 0:
            return torch.zeros_like(q)
        if q_t.shape != dis.shape:
            raise ValueError(f"q and dislike must have the same length, got {q_t.shape} and {dis.shape}")
        if not bool(torch.isfinite(q_t).all()):
            raise ValueError("q must be finite (drop samples without feedback first)")
        qf = q_t.to(torch.float64)
        if tau is None:
            tau = torch.quantile(qf, 1.0 - top_fraction, interpolation="linear")
        adv = torch.where(dis, -1.0, torch.where(qf > tau, 1.0, 0.0)).to(torch.float64)
        return adv.to(q.dtype if q.is_floating_point() else torch.float32).reshape(q.shape)
    q_a = np.asarray(q, dtype=np.float64)
    dis = np.asarray(dislike).astype(bool)
    if q_a.size == 0:
        return np.zeros(q_a.shape, dtype=np.float64)
    if q_a.shape != dis.shape:
        raise ValueError(f"q and dislike must have the same shape, got {q_a.shape} and {dis.shape}")
    if not np.isfinite(q_a).all():
        raise ValueError("q must be finite (drop samples without feedback first)")
    if tau is None:
        tau = np.quantile(q_a, 1.0 - top_fraction)
    return np.where(dis, -1.0, np.where(q_a > tau, 1.0, 0.0))


def tau_threshold(q_window, top_fraction: float = 0.25) -> float:
    """tau_B over a window of q values: quantile(q, 1 - top_fraction), linear; the caller's window."""
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction!r}")
    q_a = np.asarray(q_window, dtype=np.float64).reshape(-1)
    if q_a.size == 0:
        raise ValueError("tau_threshold needs at least one q")
    if not np.isfinite(q_a).all():
        raise ValueError("q must be finite (drop samples without feedback first)")
    return float(np.quantile(q_a, 1.0 - top_fraction))
