"""The two architectures the lazy decoder is measured against (report Tables 1-2), same inputs and loss.

Invariant: a baseline differs from `LazyDecoder` only in how the context reaches the 3 target
tokens; the context embedder, Embed([BOS, s1, s2]), per-level heads and L_Gen are shared code.

- `EncoderDecoder` (OneRec-V1): a bidirectional encoder over the context tokens; decoder blocks of
  causal self-attention over [BOS, s1, s2], cross-attention WITH K/V projections, FFN.
- `NaiveDecoderOnly`: [context tokens, BOS, s1, s2] in one causal sequence; logits at the last 3.

Equal parameter count (how the benches size them, `equal_param_layers`): with d_attn = d_model
a lazy block holds 6 d^2 + F (cross W_q, W_o; self W_q,k,v,o; F = 3 d d_ff), an encoder block
4 d^2 + F and a decoder block 8 d^2 + F. So an encoder-decoder with N/2 + N/2 blocks (1:1, as in
Table 1's 0.5B:0.5B) has the lazy decoder's N (6 d^2 + F) exactly, and the naive decoder-only gets
round(N (6 d^2 + F) / (4 d^2 + F)) blocks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from learner.config import ModelConfig
from learner.context import ContextEmbedder
from learner.features import ContextBatch
from learner.model import SemanticIdModel, init_weights
from learner.ops.attention import attention
from learner.moe import SwiGLU


def equal_param_layers(cfg: ModelConfig) -> dict[str, int]:
    """Block counts giving the baselines the lazy decoder's parameters (see the module docstring)."""
    d, da, f = cfg.d_model, cfg.d_attn, 3 * cfg.d_model * cfg.d_ff
    lazy_block = 6 * d * da + f
    n_enc = max(1, cfg.n_layers // 2)
    return {"encoder": n_enc, "decoder": max(1, cfg.n_layers - n_enc),
            "naive": max(1, round(cfg.n_layers * lazy_block / (4 * d * da + f)))}


class SelfAttention(nn.Module):
    """Multi-head attention with Q, K, V, O projections; `context` switches to cross-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.q = nn.Linear(cfg.d_model, cfg.d_attn, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_attn, bias=False)
        self.o = nn.Linear(cfg.d_attn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, impl: str,
                context: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        src = x if context is None else context
        q = self.q(x).view(b, t, self.n_heads, self.d_head).transpose(1, 2)                # (B, H, T, dh)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        return self.o(attention(q, k, v, allowed, impl=impl).transpose(1, 2).reshape(b, t, -1))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn, self.norm_ffn = nn.RMSNorm(cfg.d_model, eps=1e-6), nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = SelfAttention(cfg)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, impl: str) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), allowed, impl)
        return x + self.ffn(self.norm_ffn(x))


class DecoderBlock(nn.Module):
    """OneRec-V1 decoder block: causal self-attn, cross-attn with K/V projections, FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = (nn.RMSNorm(cfg.d_model, eps=1e-6) for _ in range(3))
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = SelfAttention(cfg)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, h: torch.Tensor, memory: torch.Tensor, memory_allowed: torch.Tensor | None, impl: str):
        t = h.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        h = h + self.self_attn(self.norm_self(h), causal, impl)
        h = h + self.cross_attn(self.norm_cross(h), memory_allowed, impl, context=memory)
        return h + self.ffn(self.norm_ffn(h))


class EncoderDecoder(SemanticIdModel):
    def __init__(self, cfg: ModelConfig, *, n_encoder_layers: int | None = None, n_decoder_layers: int | None = None):
        super().__init__(cfg)
        layers = equal_param_layers(cfg)
        self.context_embed = ContextEmbedder(cfg, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(n_encoder_layers or layers["encoder"]))
        self.encoder_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(n_decoder_layers or layers["decoder"]))
        self.apply(init_weights)

    def forward(self, ctx: ContextBatch, target_sids: torch.Tensor) -> torch.Tensor:
        ctx.check(self.cfg)
        self.check_targets(target_sids, len(ctx))
        x, mask = self.context_embed(ctx)                                   # (B, N, d), (B, N)
        allowed = None if bool(mask.all()) else mask[:, None, None, :]
        for block in self.encoder:
            x = block(x, allowed, self.attn_impl)
        memory = self.encoder_norm(x)
        h = self.token_emb(self.teacher_rows(target_sids))                  # (B, 3, d)
        for block in self.decoder:
            h = block(h, memory, allowed, self.attn_impl)
        return self.all_level_logits(h)


class NaiveDecoderOnly(SemanticIdModel):
    def __init__(self, cfg: ModelConfig, *, n_layers: int | None = None):
        super().__init__(cfg)
        self.context_embed = ContextEmbedder(cfg, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(n_layers or equal_param_layers(cfg)["naive"]))
        self.apply(init_weights)

    def forward(self, ctx: ContextBatch, target_sids: torch.Tensor) -> torch.Tensor:
        ctx.check(self.cfg)
        self.check_targets(target_sids, len(ctx))
        x, mask = self.context_embed(ctx)                                   # (B, N, d)
        h = torch.cat([x, self.token_emb(self.teacher_rows(target_sids))], dim=1)  # (B, N + 3, d)
        b, s, _ = h.shape
        real = torch.cat([mask, torch.ones(b, 3, dtype=torch.bool, device=h.device)], dim=1)
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        # causal and real keys; every position may see itself so that padded rows stay finite
        allowed = (causal & real[:, None, :]) | torch.eye(s, dtype=torch.bool, device=h.device)
        allowed = allowed[:, None]                                            # (B, 1, S, S)
        for block in self.blocks:
            h = block(h, allowed, self.attn_impl)
        return self.all_level_logits(h[:, -3:])


class SASRec(nn.Module):
    """SASRec-style baseline (Kang & McAuley 2018): causal self-attention over item-id embeddings with
    learned positions; the next item is scored by a dot product with the shared item embeddings."""

    def __init__(self, n_items: int, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                 max_len: int = 50, dropout: float = 0.2):
        super().__init__()
        self.max_len = max_len
        self.item_emb = nn.Embedding(n_items + 1, d_model, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=d_model * 2, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.item_emb.weight, std=0.02)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) item indices (0 = padding, left-padded) -> hidden states (B, L, d)."""
        length = seq.shape[1]
        pos = torch.arange(self.max_len - length, self.max_len, device=seq.device)  # the newest item sits last
        h = self.drop(self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)
        return self.norm(self.encoder(h, mask=causal))         # (B, L, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., N) scores of items 1..N (shared item embeddings)."""
        return hidden @ self.item_emb.weight[1:].T
