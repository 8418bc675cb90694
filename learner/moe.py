"""Feed-forward layers: SwiGLU, and the mixture of experts of the deeper lazy-decoder blocks.

Invariant: routing never changes the gradient path of the loss: the balancing bias (DeepSeek-V3's
auxiliary-loss-free strategy) only decides which experts are chosen, the gate weights come from
the unbiased affinities, and the bias moves outside autograd toward under-loaded experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig


class SwiGLU(nn.Module):
    """FFN(x) = W_down(silu(W_gate x) * W_up x); 3 * d * d_ff parameters."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEFeedForward(nn.Module):
    """Shared expert(s) + routed top-k experts with sigmoid affinities and a balancing bias.

    Selection: top-k of (sigmoid(x W_router) + bias); gates: the selected unbiased affinities,
    normalized to sum to 1. In training mode each forward updates the bias by
    `rate * sign(mean load - load)` per expert (DeepSeek-V3, section 2.1.2).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, e = cfg.d_model, cfg.moe_d_ff, cfg.n_experts
        self.n_experts, self.top_k, self.rate = e, cfg.moe_top_k, cfg.moe_bias_update_rate
        self.shared = SwiGLU(d, cfg.n_shared_experts * f) if cfg.n_shared_experts else None
        self.router = nn.Linear(d, e, bias=False)
        scale = d ** -0.5
        self.w_gate = nn.Parameter(torch.randn(e, d, f) * scale)   # (E, d, f)
        self.w_up = nn.Parameter(torch.randn(e, d, f) * scale)
        self.w_down = nn.Parameter(torch.randn(e, f, d) * f ** -0.5)
        self.register_buffer("expert_bias", torch.zeros(e))
        self.register_buffer("last_load", torch.zeros(e), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, d) -> (expert index (M, k), gate weight (M, k))."""
        affinity = torch.sigmoid(self.router(x).float())                     # (M, E)
        index = torch.topk(affinity + self.expert_bias, self.top_k, dim=-1).indices
        gates = affinity.gather(1, index)
        return index, (gates / gates.sum(-1, keepdim=True)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                      # (M, d)
        index, gates = self.route(flat)
        out = torch.zeros_like(flat)
        order = torch.argsort(index.reshape(-1))                             # (M*k,) grouped by expert
        load = torch.bincount(index.reshape(-1), minlength=self.n_experts)
        token = order // self.top_k
        gate = gates.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(load.tolist()):
            if count == 0:
                continue
            rows = token[start:start + count]
            xe = flat[rows]                                                   # (c, d)
            he = F.silu(xe @ self.w_gate[expert]) * (xe @ self.w_up[expert])  # (c, f)
            out.index_add_(0, rows, (he @ self.w_down[expert]) * gate[start:start + count, None])
            start += count
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training and self.rate > 0:
            self.update_bias(load)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Move the bias up for experts below the mean load, down for those above."""
        load = load.float()
        self.last_load.copy_(load)
        self.expert_bias.add_(self.rate * torch.sign(load.mean() - load))
