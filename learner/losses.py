"""Policy losses of the report: GBPO (eqs. 11-12) and the OneRec-V1 baseline ECPO (eqs. 13-14).

Invariant: the stop-gradient old policy is the only place `sg(pi)` enters; where `logp_old`
is NaN (an exposure from legacy traffic with no logged probability) pi_old = sg(pi), so the
ratio is exactly 1 and only the gradient shape of eqs. 15-18 remains.

All arithmetic is in log space: item probabilities of a 3-level semantic id are tiny
(~V^-3), so `pi` itself underflows long before `log pi` does. Inputs are log-probabilities
of the same shape; the learner passes one per generated item (`LazyDecoder.item_logprob`,
the sum over the 3 semantic-id levels), matching the sequence-level ratio of eq. 11.
Each loss returns the mean over elements (a scalar).

`gen_loss` is L_Gen (eq. 10) on logits; `learner.model.LazyDecoder.loss` is the model's entry point.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gen_loss(logits: torch.Tensor, target_sids: torch.Tensor) -> torch.Tensor:
    """L_Gen, eq. 10: next-token cross-entropy, mean over the 3 semantic-id positions and the batch."""
    if logits.dim() != 3 or target_sids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, 3, V) and target_sids (B, 3), got {tuple(logits.shape)} "
                         f"and {tuple(target_sids.shape)}")
    return F.cross_entropy(logits.float().flatten(0, 1), target_sids.flatten())  # (B*3, V) vs (B*3,)


def _check(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> None:
    if logp.shape != logp_old.shape:
        raise ValueError(f"logp_old must have logp's shape {tuple(logp.shape)}, got {tuple(logp_old.shape)}")
    if adv.shape != logp.shape:
        raise ValueError(f"adv must have logp's shape {tuple(logp.shape)}, got {tuple(adv.shape)}")
    if logp.numel() == 0:
        raise ValueError("logp must not be empty")


def _old_logp(logp_sg: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """log pi_old, with NaN (legacy traffic) replaced by log sg(pi)."""
    return torch.where(torch.isnan(logp_old), logp_sg, logp_old)


def _log1m_exp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p <= 0, stable at both ends."""
    log_p = log_p.clamp(max=-1e-7)
    return torch.where(log_p > -0.6931,
                       torch.log(-torch.expm1(log_p)),
                       torch.log1p(-torch.exp(log_p)))


def gbpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """GBPO, eqs. 11-12: mean of -A * pi / pi'_old with a dynamic, BCE-like bound on pi_old.

    pi'_old = max(pi_old, sg(pi)) where A >= 0 and max(pi_old, 1 - sg(pi)) where A < 0, so a
    negative sample's gradient never exceeds BCE's (eq. 18) and no sample is discarded.
    """
    _check(logp, logp_old, adv)
    logp = logp.float()                                         # (N,)
    logp_sg = logp.detach()
    log_old = _old_logp(logp_sg, logp_old.float().to(logp.device))
    adv = adv.float().to(logp.device)
    log_bound = torch.where(adv >= 0, logp_sg, _log1m_exp(logp_sg))   # eq. 12
    log_old_prime = torch.maximum(log_old, log_bound)
    ratio = torch.exp(logp - log_old_prime)                    # pi / pi'_old
    return (-adv * ratio).mean()                               # eq. 11


def ecpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
              eps: float = 0.2, delta: float = 0.1) -> torch.Tensor:
    """ECPO (OneRec-V1), eqs. 13-14: PPO-style clipping with an early clip of pi_old.

    pi'_old = max(sg(pi) / (1 + eps + delta), pi_old) bounds the ratio by 1 + eps + delta
    before the usual min(r A, clip(r, 1 - eps, 1 + eps) A).
    """
    if eps <= 0 or delta <= 0:
        raise ValueError(f"eps and delta must be > 0, got eps={eps} delta={delta}")
    _check(logp, logp_old, adv)
    logp = logp.float()
    logp_sg = logp.detach()
    log_old = _old_logp(logp_sg, logp_old.float().to(logp.device))
    adv = adv.float().to(logp.device)
    log_old_prime = torch.maximum(logp_sg - math.log1p(eps + delta), log_old)  # eq. 14
    ratio = torch.exp(logp - log_old_prime)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * adv
    return -torch.minimum(unclipped, clipped).mean()           # eq. 13
