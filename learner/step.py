"""One training step, the only one: the online learner, pretraining and both evaluation trainers call it.

Invariant: one forward pass per step. L_Gen (eq. 10) and the item log-probabilities that the RL
term needs (log pi = sum over the 3 semantic-id levels) come from the same logits, so the context
batch is built once and the model runs once on it; the RL term reads only the rows with A != 0.

    batch = StepBatch(ctx, target, logp_old=..., adv=...)      # tensors, already on the device
    result = train_step(model, optimizer, batch, weights=StepWeights.from_train(train_cfg))

A step whose loss is not finite is skipped (no backward, no optimizer step) and reported as
`result.finite == False`: the caller counts it; the weights are never poisoned.

On CPU the first step also tells glibc to keep freed activation buffers for reuse
(`learner.ops.memory.retain_freed_memory`: 20-30% of the step was page faults).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.features import ContextBatch
from learner.losses import LEVELS, rl_rows
from learner.ops import memory, precision

ALGORITHMS = ("gbpo", "ecpo", "sft")
NORMALIZATIONS = ("group", "active")


@dataclass
class StepBatch:
    """What one step trains on. `logp_old` NaN = no logged probability (legacy traffic: pi_old = sg(pi));
    `adv` 0 = no RL signal for that row (L_Gen only). Both None for a pure L_Gen step.
    `gen_mask` False = the row is left out of L_Gen (`train.gen_on_dislikes = false`); None = all rows."""

    ctx: ContextBatch
    target: torch.Tensor                     # (B, 3) int64 semantic ids
    logp_old: torch.Tensor | None = None     # (B,) float
    adv: torch.Tensor | None = None          # (B,) float
    gen_mask: torch.Tensor | None = None     # (B,) bool

    def __post_init__(self) -> None:
        b = len(self.ctx)
        if tuple(self.target.shape) != (b, 3):
            raise ValueError(f"StepBatch.target must be ({b}, 3), got {tuple(self.target.shape)}")
        for name in ("logp_old", "adv", "gen_mask"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b,):
                raise ValueError(f"StepBatch.{name} must be ({b},), got {tuple(value.shape)}")


@dataclass(frozen=True)
class StepWeights:
    """The loss: `sft_weight * L_Gen + rl_weight * RL`, RL = GBPO (eqs. 11-12), ECPO (eqs. 13-14) or none.

    `rl_level`: token | item (see learner.losses). `rl_normalization`: "group" = eq. 11's 1/G with
    G = every row of the batch (rows with A = 0 count in G and add 0), so a sample's RL weight is the
    same whatever the batch's make-up; "active" = mean over the rows with A != 0 (the old behaviour,
    whose weight against L_Gen moved with each batch's share of positives and dislikes).
    """

    algorithm: str = "sft"
    sft_weight: float = 1.0
    rl_weight: float = 1.0
    ecpo_eps: float = 0.2
    ecpo_delta: float = 0.1
    grad_clip: float = 1.0
    rl_level: str = "token"
    rl_normalization: str = "group"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.rl_level not in LEVELS:
            raise ValueError(f"rl_level must be one of {LEVELS}, got {self.rl_level!r}")
        if self.rl_normalization not in NORMALIZATIONS:
            raise ValueError(f"rl_normalization must be one of {NORMALIZATIONS}, got {self.rl_normalization!r}")

    @classmethod
    def from_train(cls, train_cfg, *, algorithm: str | None = None) -> "StepWeights":
        return cls(algorithm=algorithm or train_cfg.algorithm, sft_weight=train_cfg.sft_weight,
                   rl_weight=train_cfg.rl_weight, ecpo_eps=train_cfg.ecpo_eps, ecpo_delta=train_cfg.ecpo_delta,
                   grad_clip=train_cfg.grad_clip, rl_level=train_cfg.rl_level,
                   rl_normalization=train_cfg.rl_normalization)


@dataclass
class StepResult:
    loss: float
    gen: float
    rl: float
    finite: bool
    positives: int = 0
    negatives: int = 0


def token_logprobs(model, ctx: ContextBatch, target: torch.Tensor) -> torch.Tensor:
    """One forward -> log p(s_i | user, s_<i) of the target's 3 tokens (B, 3), with gradients."""
    logits = model(ctx, target)                                          # (B, 3, K)
    logp_tokens = logits.float().log_softmax(-1)                         # (B, 3, K)
    return logp_tokens.gather(-1, target[..., None]).squeeze(-1)         # (B, 3)


def gen_term(picked: torch.Tensor, gen_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_Gen (eq. 10) from the (B, 3) target log-probs: mean over tokens and the rows in `gen_mask`."""
    if gen_mask is None:
        return -picked.mean()
    kept = gen_mask.to(picked.device, torch.bool)
    if not bool(kept.any()):
        return picked.sum() * 0.0                                        # no row: 0, graph kept
    return -picked[kept].mean()


def gen_and_logprob(model, ctx: ContextBatch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (L_Gen scalar (eq. 10), log pi(item | user) (B,)), both with gradients."""
    picked = token_logprobs(model, ctx, target)                          # (B, 3)
    return gen_term(picked), picked.sum(-1)


def rl_term(logp_tokens: torch.Tensor, batch: StepBatch, weights: StepWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The RL loss (zero for `sft` or when no row has A != 0) and the rows with A != 0.

    logp_tokens (B, 3): per-token log-probs (`token_logprobs`). Rows with A != 0 are summed and
    divided by G = B (`group`, eq. 11) or by their own count (`active`).
    """
    if weights.algorithm == "sft" or batch.adv is None:
        return logp_tokens.new_zeros(()), logp_tokens.new_zeros(0, dtype=torch.long)
    if logp_tokens.dim() != 2:
        raise ValueError(f"rl_term takes per-token log-probs (B, 3), got {tuple(logp_tokens.shape)}")
    rows = torch.nonzero(batch.adv != 0).flatten()
    if not len(rows):
        return logp_tokens.new_zeros(()), rows
    logp_old = batch.logp_old if batch.logp_old is not None else torch.full_like(batch.adv, float("nan"))
    per_row = rl_rows(weights.algorithm, logp_tokens[rows], logp_old[rows], batch.adv[rows],
                      level=weights.rl_level, eps=weights.ecpo_eps, delta=weights.ecpo_delta)   # (R,)
    group = len(batch.adv) if weights.rl_normalization == "group" else len(rows)
    return per_row.sum() / group, rows                                                           # eq. 11


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere: `learner.ops.precision` decides."""
    return precision.autocast_for(device)


def train_step(model, optimizer: torch.optim.Optimizer, batch: StepBatch, *, weights: StepWeights,
               autocast=None) -> StepResult:
    """Zero grads, one forward, L_Gen + RL, backward, clip, step. Non-finite loss: no update."""
    if batch.target.device.type == "cpu":
        memory.retain_freed_memory()      # once per process: reuse activation pages (learner.ops.memory)
    optimizer.zero_grad(set_to_none=True)
    with autocast if autocast is not None else autocast_for(batch.target.device):
        picked = token_logprobs(model, batch.ctx, batch.target)         # (B, 3), the one forward
        gen = gen_term(picked, batch.gen_mask)
        rl, _ = rl_term(picked, batch, weights)
        loss = weights.sft_weight * gen + weights.rl_weight * rl
    positives = int((batch.adv > 0).sum()) if batch.adv is not None else 0
    negatives = int((batch.adv < 0).sum()) if batch.adv is not None else 0
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float(loss.detach()), float(gen.detach()), float(rl.detach()), False, positives, negatives)
    loss.backward()
    if weights.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), weights.grad_clip)
    optimizer.step()
    return StepResult(float(loss.detach()), float(gen.detach()), float(rl.detach()), True, positives, negatives)

