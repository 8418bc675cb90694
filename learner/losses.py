"""Policy losses of the report: GBPO (eqs. 11-12) and the OneRec-V1 baseline ECPO (eqs. 13-14).

Invariant: the stop-gradient old policy is the only place `sg(pi)` enters; where `logp_old`
is NaN (an exposure from legacy traffic with no logged probability) pi_old = sg(pi), so the
ratio is exactly 1 and only the gradient shape of eqs. 15-18 remains.

All arithmetic is in log space: item probabilities of a 3-level semantic id are tiny
(~V^-3), so `pi` itself underflows long before `log pi` does.

Two levels (`rl_rows(..., level=)`, the `train.rl_level` switch):
- "item": pi = p(s1) p(s2|s1) p(s3|s1,s2), the sequence-level ratio of eq. 11.
- "token": the ratio and bound of eqs. 11-12 (13-14) per semantic-id token, pi = p(s_i | prefix),
  as the report's gradient analysis (eqs. 15-18, "a specific token i") reads; a row's loss is the
  mean over its 3 tokens, so at ratio 1 it equals the item level's value (-A).
  Serving logs one log pi_old per item; a token's pi_old is its current sg(p) times the item's drift
  spread evenly, log p_old_i = log sg(p_i) + (log pi_old - log sg(pi)) / 3, so the 3 token pi_old
  multiply to the logged item pi_old exactly. A (N, 3) logp_old (per-token logging) is used as is.
Why token is the default: at item level a negative's GBPO gradient on log pi is pi / (1 - pi) ~ pi,
1e-5 at pi = 1e-5 (and ~V^-3 = 4e-6 for a uniform tiny model, 2e-12 for V = 8192): dislikes do
nothing. Per token, p ~ 1/V ... 0.9, so the bound of eq. 12 gives p / (1 - p) per token: negatives
act, and still no more than BCE's eq. 18 allows (see tests/test_losses.py for the closed forms).

`*_objective` return the per-element term (no reduction); `gbpo_loss` / `ecpo_loss` their mean.
`plain_ratio_objective` (-A pi / pi_old, no bound, no clip) exists to be measured (bench/rl_grad.py).

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
    """GBPO, eqs. 11-12: the mean of `gbpo_objective`."""
    return gbpo_objective(logp, logp_old, adv).mean()


def gbpo_objective(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """GBPO, eqs. 11-12, per element: -A * pi / pi'_old with a dynamic, BCE-like bound on pi_old.

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
    return -adv * ratio                                        # eq. 11, before the 1/G sum


def ecpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
              eps: float = 0.2, delta: float = 0.1) -> torch.Tensor:
    """ECPO, eqs. 13-14: the mean of `ecpo_objective`."""
    return ecpo_objective(logp, logp_old, adv, eps=eps, delta=delta).mean()


def ecpo_objective(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                   eps: float = 0.2, delta: float = 0.1) -> torch.Tensor:
    """ECPO (OneRec-V1), eqs. 13-14, per element: PPO-style clipping with an early clip of pi_old.

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
    return -torch.minimum(unclipped, clipped)                  # eq. 13, before the 1/G sum


def plain_ratio_objective(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """-A * pi / pi_old per element, no bound and no clip: Figure 8's reference, measured, never trained on."""
    _check(logp, logp_old, adv)
    logp = logp.float()
    log_old = _old_logp(logp.detach(), logp_old.float().to(logp.device))
    return -adv.float().to(logp.device) * torch.exp(logp - log_old)


OBJECTIVES = {"gbpo": gbpo_objective, "ecpo": ecpo_objective, "plain_ratio": plain_ratio_objective}
LEVELS = ("token", "item")


def token_logp_old(logp_tokens: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """(N, 3) per-token log pi_old from an item-level (N,) one: the item's drift spread evenly.

    log p_old_i = log sg(p_i) + (log pi_old - sum_j log sg(p_j)) / 3; NaN (legacy) stays NaN, so
    `_old_logp` makes it sg(p_i). A (N, 3) logp_old is returned unchanged.
    """
    if logp_old.shape == logp_tokens.shape:
        return logp_old
    if logp_tokens.dim() != 2 or logp_old.shape != logp_tokens.shape[:1]:
        raise ValueError(f"logp_old must be (N,) or (N, 3) for token logp {tuple(logp_tokens.shape)}, "
                         f"got {tuple(logp_old.shape)}")
    sg = logp_tokens.detach().float()                                       # (N, 3)
    drift = (logp_old.float().to(sg.device) - sg.sum(-1)) / sg.shape[-1]    # (N,)
    return sg + drift[:, None]


def rl_rows(objective: str, logp_tokens: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, *,
            level: str = "token", eps: float = 0.2, delta: float = 0.1) -> torch.Tensor:
    """Per-row RL loss (N,) of `objective` (gbpo | ecpo | plain_ratio) at `level` (token | item).

    logp_tokens (N, 3) = log p(s_i | prefix) with gradients; logp_old (N,) item-level (NaN = legacy)
    or (N, 3); adv (N,). Item: the objective on sum_i log p_i. Token: the objective per token with
    the row's A, mean over the 3 tokens. The caller sums rows and applies eq. 11's 1/G.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if logp_tokens.dim() != 2 or adv.shape != logp_tokens.shape[:1]:
        raise ValueError(f"logp_tokens must be (N, 3) and adv (N,), got {tuple(logp_tokens.shape)} "
                         f"and {tuple(adv.shape)}")
    fn = OBJECTIVES[objective]
    kwargs = {"eps": eps, "delta": delta} if objective == "ecpo" else {}
    if level == "item":
        item_old = logp_old.sum(-1) if logp_old.dim() == 2 else logp_old
        return fn(logp_tokens.sum(-1), item_old, adv, **kwargs)                          # (N,)
    old = token_logp_old(logp_tokens, logp_old)                                           # (N, 3)
    return fn(logp_tokens, old, adv[:, None].expand_as(logp_tokens), **kwargs).mean(-1)   # (N,)
