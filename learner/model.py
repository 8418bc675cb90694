"""The lazy decoder (eqs. 5-10): 3 target tokens attend to a context processed once.

Invariant: compute per sample scales with the 3 target tokens, not with the context: the context
enters only as the (k, v) of the context processor, shared by every block in a kv-layer group
(eq. 9), by every query head in a G_kv group, and by every beam of a request.

The attention ops (reference, SDPA and the Triton decode kernel, chosen in one place) live in
`learner.ops`; `LazyDecoder.attn_impl` ("sdpa" or "reference") is what the model asks them for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig
from learner.context import ContextKV, ContextProcessor
from learner.features import ContextBatch
from learner.moe import MoEFeedForward, SwiGLU
from learner.ops.rows import RMSNorm
from learner.ops.attention import cached_self_attention, cross_attention


# ----------------------------------------------------------------------------- blocks
class LazyBlock(nn.Module):
    """Eqs. (6)-(8): lazy cross-attn (W_q, W_o only), causal self-attn, FFN or MoE; pre-RMSNorm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, da = cfg.d_model, cfg.d_attn
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.norm_cross = RMSNorm(d, eps=1e-6)
        self.cross_q = nn.Linear(d, da, bias=False)
        self.cross_o = nn.Linear(da, d, bias=False)
        self.norm_self = RMSNorm(d, eps=1e-6)
        self.self_qkv = nn.Linear(d, 3 * da, bias=False)
        self.self_o = nn.Linear(da, d, bias=False)
        self.norm_ffn = RMSNorm(d, eps=1e-6)
        self.ffn = MoEFeedForward(cfg) if cfg.is_moe_layer(layer) else SwiGLU(d, cfg.d_ff)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None, impl: str, keep_cache: bool = True):
        """h (B*W, T, d); past self-attn (k, v) (B*W, H, T_past, dh) or None -> (h, (k, v) incl. these T).

        keep_cache=False: the caller will not read the returned (k, v): it is None (and the fused
        decode path skips building the concatenation)."""
        bw, t, _ = h.shape
        q = self.cross_q(self.norm_cross(h)).view(bw, t, self.n_heads, self.d_head)
        x = cross_attention(q, k, v, mask, impl=impl).reshape(bw, t, -1)
        h = h + self.dropout(self.cross_o(x))                                     # eq. (6)
        qkv = self.self_qkv(self.norm_self(h)).view(bw, t, 3, self.n_heads, self.d_head)
        sq, sk, sv = qkv.permute(2, 0, 3, 1, 4)                                    # (B*W, H, T, dh) each
        x, cache = cached_self_attention(sq, sk, sv, past, impl=impl, keep_cache=keep_cache)
        x = x.transpose(1, 2).reshape(bw, t, -1)
        h = h + self.dropout(self.self_o(x))                                      # eq. (7)
        h = h + self.dropout(self.ffn(self.norm_ffn(h)))                          # eq. (8)
        return h, cache


class SemanticIdModel(nn.Module):
    """What the three architectures share: Embed([BOS, s1, s2]) (eq. 5), per-level RMSNorm + head,
    and the training API on top of `forward(ctx, target_sids) -> logits (B, 3, K)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = "sdpa"
        k = cfg.codebook_size
        self.token_emb = nn.Embedding(1 + 2 * k, cfg.d_model)   # rows: BOS, s1 (K), s2 (K)   eq. (5)
        self.out_norms = nn.ModuleList(RMSNorm(cfg.d_model, eps=1e-6) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, k, bias=False) for _ in range(3))

    def input_tokens(self, prefix: torch.Tensor, start: int) -> torch.Tensor:
        """Semantic ids at levels start.. -> embedding rows: BOS = 0, s1 -> 1 + s1, s2 -> 1 + K + s2."""
        offsets = torch.tensor([1, 1 + self.cfg.codebook_size], device=prefix.device)
        return prefix + offsets[start - 1: start - 1 + prefix.shape[1]]

    def teacher_rows(self, target_sids: torch.Tensor) -> torch.Tensor:
        """(B, 3) target ids -> (B, 3) embedding rows of [BOS, s1, s2]."""
        bos = torch.zeros_like(target_sids[:, :1])
        return torch.cat([bos, self.input_tokens(target_sids[:, :2], start=1)], dim=1)

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """(..., d) -> (..., K) logits of s^{level+1}; float32 for a stable softmax."""
        return self.heads[level](self.out_norms[level](hidden)).float()

    def all_level_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 3, d) hidden at [BOS, s1, s2] -> (B, 3, K)."""
        return torch.stack([self.level_logits(hidden[:, i], i) for i in range(3)], dim=1)

    def loss(self, ctx: ContextBatch, target_sids: torch.Tensor) -> torch.Tensor:
        """Eq. (10): L_Gen = -1/3 sum_i log p(s^i | BOS, s^<i, context), averaged over the batch."""
        logits = self(ctx, target_sids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_sids.reshape(-1))

    def item_logprob(self, ctx: ContextBatch, target_sids: torch.Tensor) -> torch.Tensor:
        """log pi(item | user) = sum over the 3 levels of log p(s^i | ...) -> (B,)."""
        logp = self(ctx, target_sids).log_softmax(-1)
        return logp.gather(-1, target_sids[..., None]).squeeze(-1).sum(-1)

    def check_targets(self, target_sids: torch.Tensor, batch: int) -> None:
        if not isinstance(target_sids, torch.Tensor) or target_sids.dtype != torch.long:
            raise ValueError("target_sids: expected an int64 tensor (B, 3)")
        if tuple(target_sids.shape) != (batch, 3):
            raise ValueError(f"target_sids: expected shape ({batch}, 3), got {tuple(target_sids.shape)}")
        if target_sids.numel() and (int(target_sids.min()) < 0 or int(target_sids.max()) >= self.cfg.codebook_size):
            raise ValueError(f"target_sids: values must be in [0, {self.cfg.codebook_size})")


class LazyDecoder(SemanticIdModel):
    """Context processor + N_layer lazy blocks + position-specific RMSNorm and head per level."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.context = ContextProcessor(cfg)
        self.blocks = nn.ModuleList(LazyBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.apply(init_weights)

    # ------------------------------------------------------------------ pieces beam search reuses
    def context_kv(self, ctx: ContextBatch) -> ContextKV:
        """Eqs. (1)-(4): L_kv pairs (k, v), each (B, G_kv, N, d_head), with `.mask`."""
        ctx.check(self.cfg)
        return self.context(ctx)

    def decode(self, kv: ContextKV, token_rows: torch.Tensor, past: list | None = None, *, keep_cache: bool = True):
        """Run the blocks on new input tokens given earlier ones' self-attn cache.

        token_rows (B*W, T) embedding rows; past: per layer (k, v) of earlier positions or None.
        Returns hidden (B*W, T, d) and the extended cache (None with keep_cache=False: the caller
        feeds no later token, and the CUDA decode path then skips concatenating it).
        """
        h = self.token_emb(token_rows)                                    # (B*W, T, d)
        cache = []
        for layer, block in enumerate(self.blocks):
            k, v = kv[self.cfg.kv_layer(layer)]                           # eq. (9)
            h, layer_cache = block(h, k, v, kv.mask, None if past is None else past[layer], self.attn_impl,
                                   keep_cache)
            cache.append(layer_cache)
        return h, cache if keep_cache else None

    def forward(self, ctx: ContextBatch, target_sids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing over [BOS, s1, s2] -> logits (B, 3, K) for s1, s2, s3."""
        kv = self.context_kv(ctx)
        self.check_targets(target_sids, len(ctx))
        hidden, _ = self.decode(kv, self.teacher_rows(target_sids))        # (B, 3, d)
        return self.all_level_logits(hidden)


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
