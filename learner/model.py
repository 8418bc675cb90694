"""The lazy decoder (eqs. 5-10): 3 target tokens attend to a context processed once.

Invariant: compute per sample scales with the 3 target tokens, not with the context: the context
enters only as the (k, v) of the context processor, shared by every block in a kv-layer group
(eq. 9), by every query head in a G_kv group, and by every beam of a request.

Each attention op has one entry point with input checks and two paths: `"reference"` (plain
matmul + softmax, the definition) and `"sdpa"` (torch's fused scaled_dot_product_attention);
tests compare them. `LazyDecoder.attn_impl` selects the path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig
from learner.context import ContextKV, ContextProcessor
from learner.features import ContextBatch
from learner.moe import MoEFeedForward, SwiGLU

ATTN_IMPLS = ("sdpa", "reference")


# ----------------------------------------------------------------------------- attention ops
def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    *, impl: str = "sdpa") -> torch.Tensor:
    """Lazy cross-attention with GQA, shared by W rows (beams) per context.

    q (B*W, T, H, dh); k, v (B, G, N, dh); mask (B, N) bool or None -> (B*W, T, H, dh).
    Query head h reads kv group h // (H / G).
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"cross_attention: q must be 4-D (B*W, T, H, dh), k/v 4-D equal (B, G, N, dh); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bw, t, h, dh = q.shape
    b, g, n, dk = k.shape
    if dk != dh or h % g or bw % b:
        raise ValueError(f"cross_attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if mask is not None and tuple(mask.shape) != (b, n):
        raise ValueError(f"cross_attention: mask must be {(b, n)}, got {tuple(mask.shape)}")
    w, r = bw // b, h // g
    if impl == "reference":
        kr = k.repeat_interleave(r, dim=1)                                   # (B, H, N, dh)
        vr = v.repeat_interleave(r, dim=1)
        qb = q.view(b, w, t, h, dh)
        scores = torch.einsum("bwthd,bhnd->bwthn", qb, kr) / math.sqrt(dh)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, None, :], float("-inf"))
        out = torch.einsum("bwthn,bhnd->bwthd", scores.softmax(-1), vr)
        return out.reshape(bw, t, h, dh)
    if impl != "sdpa":
        raise ValueError(f"impl: must be one of {ATTN_IMPLS}, got {impl!r}")
    # fold beams, positions and the heads of a group into the query axis: one call, no K/V copies
    qg = q.view(b, w, t, g, r, dh).permute(0, 3, 1, 2, 4, 5).reshape(b, g, w * t * r, dh)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=attn_mask)     # (B, G, W*T*r, dh)
    return out.view(b, g, w, t, r, dh).permute(0, 2, 3, 1, 4, 5).reshape(bw, t, h, dh)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
              *, impl: str = "sdpa") -> torch.Tensor:
    """Plain multi-head attention: q (B, H, Tq, dh), k, v (B, H, Tk, dh), allowed broadcastable to
    (B, H, Tq, Tk) bool (True = may attend) or None -> (B, H, Tq, dh). Used by the baselines."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if impl == "reference":
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ v
    if impl != "sdpa":
        raise ValueError(f"impl: must be one of {ATTN_IMPLS}, got {impl!r}")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str = "sdpa") -> torch.Tensor:
    """q (B, H, Tq, dh) are the last Tq of the Tk positions in k, v (B, H, Tk, dh) -> (B, H, Tq, dh)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[2] > k.shape[2]:
        raise ValueError(f"causal_self_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    tq, tk = q.shape[2], k.shape[2]
    # position i of q is position tk - tq + i: it may see keys 0 .. tk - tq + i
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if impl == "reference":
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    if impl != "sdpa":
        raise ValueError(f"impl: must be one of {ATTN_IMPLS}, got {impl!r}")
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


# ----------------------------------------------------------------------------- blocks
class LazyBlock(nn.Module):
    """Eqs. (6)-(8): lazy cross-attn (W_q, W_o only), causal self-attn, FFN or MoE; pre-RMSNorm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, da = cfg.d_model, cfg.d_attn
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.norm_cross = nn.RMSNorm(d, eps=1e-6)
        self.cross_q = nn.Linear(d, da, bias=False)
        self.cross_o = nn.Linear(da, d, bias=False)
        self.norm_self = nn.RMSNorm(d, eps=1e-6)
        self.self_qkv = nn.Linear(d, 3 * da, bias=False)
        self.self_o = nn.Linear(da, d, bias=False)
        self.norm_ffn = nn.RMSNorm(d, eps=1e-6)
        self.ffn = MoEFeedForward(cfg) if cfg.is_moe_layer(layer) else SwiGLU(d, cfg.d_ff)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None, impl: str):
        """h (B*W, T, d); past self-attn (k, v) (B*W, H, T_past, dh) or None -> (h, (k, v) incl. these T)."""
        bw, t, _ = h.shape
        q = self.cross_q(self.norm_cross(h)).view(bw, t, self.n_heads, self.d_head)
        x = cross_attention(q, k, v, mask, impl=impl).reshape(bw, t, -1)
        h = h + self.dropout(self.cross_o(x))                                     # eq. (6)
        qkv = self.self_qkv(self.norm_self(h)).view(bw, t, 3, self.n_heads, self.d_head)
        sq, sk, sv = qkv.permute(2, 0, 3, 1, 4)                                    # (B*W, H, T, dh) each
        if past is not None:
            sk, sv = torch.cat([past[0], sk], dim=2), torch.cat([past[1], sv], dim=2)
        x = causal_self_attention(sq, sk, sv, impl=impl).transpose(1, 2).reshape(bw, t, -1)
        h = h + self.dropout(self.self_o(x))                                      # eq. (7)
        h = h + self.dropout(self.ffn(self.norm_ffn(h)))                          # eq. (8)
        return h, (sk, sv)


class SemanticIdModel(nn.Module):
    """What the three architectures share: Embed([BOS, s1, s2]) (eq. 5), per-level RMSNorm + head,
    and the training API on top of `forward(ctx, target_sids) -> logits (B, 3, K)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = "sdpa"
        k = cfg.codebook_size
        self.token_emb = nn.Embedding(1 + 2 * k, cfg.d_model)   # rows: BOS, s1 (K), s2 (K)   eq. (5)
        self.out_norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=1e-6) for _ in range(3))
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

    def decode(self, kv: ContextKV, token_rows: torch.Tensor, past: list | None = None):
        """Run the blocks on new input tokens given earlier ones' self-attn cache.

        token_rows (B*W, T) embedding rows; past: per layer (k, v) of earlier positions or None.
        Returns hidden (B*W, T, d) and the extended cache.
        """
        h = self.token_emb(token_rows)                                    # (B*W, T, d)
        cache = []
        for layer, block in enumerate(self.blocks):
            k, v = kv[self.cfg.kv_layer(layer)]                           # eq. (9)
            h, layer_cache = block(h, k, v, kv.mask, None if past is None else past[layer], self.attn_impl)
            cache.append(layer_cache)
        return h, cache

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
