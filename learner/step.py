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
from learner.losses import ecpo_loss, gbpo_loss
from learner.ops import memory, precision

ALGORITHMS = ("gbpo", "ecpo", "sft")


@dataclass
class StepBatch:
    """What one step trains on. `logp_old` NaN = no logged probability (legacy traffic: pi_old = sg(pi));
    `adv` 0 = no RL signal for that row (L_Gen only). Both None for a pure L_Gen step."""

    ctx: ContextBatch
    target: torch.Tensor                     # (B, 3) int64 semantic ids
    logp_old: torch.Tensor | None = None     # (B,) float
    adv: torch.Tensor | None = None          # (B,) float

    def __post_init__(self) -> None:
        b = len(self.ctx)
        if tuple(self.target.shape) != (b, 3):
            raise ValueError(f"StepBatch.target must be ({b}, 3), got {tuple(self.target.shape)}")
        for name in ("logp_old", "adv"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b,):
                raise ValueError(f"StepBatch.{name} must be ({b},), got {tuple(value.shape)}")


@dataclass(frozen=True)
class StepWeights:
    """The loss: `sft_weight * L_Gen + rl_weight * RL`, RL = GBPO (eqs. 11-12), ECPO (eqs. 13-14) or none."""

    algorithm: str = "sft"
    sft_weight: float = 1.0
    rl_weight: float = 1.0
    ecpo_eps: float = 0.2
    ecpo_delta: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")

    @classmethod
    def from_train(cls, train_cfg, *, algorithm: str | None = None) -> "StepWeights":
        return cls(algorithm=algorithm or train_cfg.algorithm, sft_weight=train_cfg.sft_weight,
                   rl_weight=train_cfg.rl_weight, ecpo_eps=train_cfg.ecpo_eps, ecpo_delta=train_cfg.ecpo_delta,
                   grad_clip=train_cfg.grad_clip)


@dataclass
class StepResult:
    loss: float
    gen: float
    rl: float
    finite: bool
    positives: int = 0
    negatives: int = 0


def gen_and_logprob(model, ctx: ContextBatch, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward -> (L_Gen scalar (eq. 10), log pi(item | user) (B,)), both with gradients."""
    logits = model(ctx, target)                                          # (B, 3, K)
    logp_tokens = logits.float().log_softmax(-1)                         # (B, 3, K)
    picked = logp_tokens.gather(-1, target[..., None]).squeeze(-1)       # (B, 3)
    return -picked.mean(), picked.sum(-1)


def rl_term(logp: torch.Tensor, batch: StepBatch, weights: StepWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The RL loss over the rows with A != 0 (zero when there are none, or for `sft`) and those rows."""
    if weights.algorithm == "sft" or batch.adv is None:
        return logp.new_zeros(()), logp.new_zeros(0, dtype=torch.long)
    rows = torch.nonzero(batch.adv != 0).flatten()
    if not len(rows):
        return logp.new_zeros(()), rows
    logp_old = batch.logp_old if batch.logp_old is not None else torch.full_like(batch.adv, float("nan"))
    if weights.algorithm == "gbpo":
        return gbpo_loss(logp[rows], logp_old[rows], batch.adv[rows]), rows                       # eqs. 11-12
    return ecpo_loss(logp[rows], logp_old[rows], batch.adv[rows],
                     eps=weights.ecpo_eps, delta=weights.ecpo_delta), rows                         # eqs. 13-14


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
        gen, logp = gen_and_logprob(model, batch.ctx, batch.target)
        rl, _ = rl_term(logp, batch, weights)
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

