"""Context processor (eqs. 1-4): heterogeneous user inputs -> per-kv-layer keys and values.

Invariant: the context is computed once per request and never projected again by the decoder:
`ContextProcessor` is the only place where context tokens meet weights; the lazy decoder's
cross-attention reads its (k, v) as they are (no K/V projections).

One sequence per user: [profile field tokens (P), short-term items, long-term items]. Each context
item carries 9 categorical features (hashed id, s1, s2, s3, duration bucket, play-time bucket, action
flags, segment, recency bucket); each embeds to `embed_dim`, the concatenation is projected to
d_context = S_kv * L_kv * G_kv * d_head (eq. 1), split into S_kv * L_kv chunks (eq. 2) and RMSNorm'd
per chunk into keys (eq. 3) and values (eq. 4; v = k when S_kv = 1).
"""
from __future__ import annotations

import torch
from torch import nn

from learner.config import N_FLAG_VALUES, N_ITEM_FEATURES, N_RECENCY_BUCKETS, ModelConfig
from learner.features import ContextBatch
from learner.ops.rows import RMSNorm, gather_rows


class ContextKV(list):
    """The context processor's output: a list of L_kv (k, v) pairs, each (B, G_kv, N, d_head).

    `.mask` (B, N) bool marks real context tokens, or is None when every token is real (the
    attention then runs without a mask)."""

    def __init__(self, pairs, mask: torch.Tensor | None):
        super().__init__(pairs)
        self.mask = mask

    @property
    def batch_size(self) -> int:
        return int(self[0][0].shape[0])


def recency_bucket(ctx: ContextBatch) -> torch.Tensor:
    """(B, T) log2 of how many items ago each item was seen (0 = newest), short before long."""
    real = ctx.mask.long()
    short = real * (ctx.segment == 0)
    long = real * (ctx.segment == 1)
    after_short = short.flip(1).cumsum(1).flip(1) - 1           # newer short items after this one
    after_long = long.flip(1).cumsum(1).flip(1) - 1
    age = torch.where(ctx.segment == 0, after_short, short.sum(1, keepdim=True) + after_long).clamp_min(0)
    return torch.log2(age.float() + 1.0).long().clamp_max(N_RECENCY_BUCKETS - 1)


class ContextEmbedder(nn.Module):
    """ContextBatch -> (tokens (B, P + T, d_out), mask (B, P + T)). Shared with the baselines."""

    def __init__(self, cfg: ModelConfig, d_out: int):
        super().__init__()
        self.cfg = cfg
        e, k = cfg.embed_dim, cfg.codebook_size
        self.item_hash = nn.Embedding(cfg.item_hash_buckets, e)  # sparse parameter
        self.semantic = nn.Embedding(3 * (k + 1), e)              # per level, row k = unknown item
        self.duration = nn.Embedding(cfg.n_duration_buckets, e)
        self.play = nn.Embedding(cfg.n_play_buckets, e)
        self.flags = nn.Embedding(N_FLAG_VALUES, e)
        self.segment = nn.Embedding(2, e)
        self.recency = nn.Embedding(N_RECENCY_BUCKETS, e)
        self.item_proj = nn.Linear(N_ITEM_FEATURES * e, d_out, bias=False)
        self.profile = nn.Embedding(max(1, cfg.profile_fields * cfg.profile_vocab), e)
        self.profile_proj = nn.Linear(e, d_out, bias=False)
        self.register_buffer("level_offset", torch.arange(3) * (k + 1), persistent=False)
        self.register_buffer("field_offset", torch.arange(cfg.profile_fields) * cfg.profile_vocab,
                             persistent=False)
        # the 9 item features' rows in one stacked table: one gather, no concatenation of 9 look-ups
        sizes = [t.num_embeddings for t in self.stacked_tables()]
        start = [sum(sizes[:i]) for i in range(len(sizes))]         # first row of each table
        offsets = [start[0], start[1], start[1] + k + 1, start[1] + 2 * (k + 1), *start[2:]]   # (9,)
        self.register_buffer("feature_offset", torch.tensor(offsets), persistent=False)

    def stacked_tables(self) -> tuple[nn.Embedding, ...]:
        """The item-feature tables in the order `item_table` stacks them."""
        return (self.item_hash, self.semantic, self.duration, self.play, self.flags, self.segment, self.recency)

    def item_table(self) -> torch.Tensor:
        """(R, e): the rows of every item-feature table, stacked (R = sum of the 7 tables' rows)."""
        return torch.cat([t.weight for t in self.stacked_tables()])

    def item_features(self, ctx: ContextBatch) -> torch.Tensor:
        """(B, T, 9e): the item's 9 feature embeddings side by side (hash, s1, s2, s3, duration, play,
        flags, segment, recency), gathered from the stacked table in one call."""
        b, t = ctx.mask.shape
        index = torch.cat([ctx.item_hash[..., None], ctx.semantic_ids, ctx.duration_bucket[..., None],
                           ctx.play_bucket[..., None], ctx.flags[..., None], ctx.segment[..., None],
                           recency_bucket(ctx)[..., None]], dim=-1) + self.feature_offset    # (B, T, 9)
        return gather_rows(self.item_table(), index).view(b, t, N_ITEM_FEATURES * self.cfg.embed_dim)

    def item_features_reference(self, ctx: ContextBatch) -> torch.Tensor:
        """What `item_features` computes, one look-up per feature (the definition, for tests)."""
        b, t = ctx.mask.shape
        sem = self.semantic(ctx.semantic_ids + self.level_offset).reshape(b, t, 3 * self.cfg.embed_dim)  # (B, T, 3e)
        return torch.cat([self.item_hash(ctx.item_hash), sem, self.duration(ctx.duration_bucket),
                          self.play(ctx.play_bucket), self.flags(ctx.flags), self.segment(ctx.segment),
                          self.recency(recency_bucket(ctx))], dim=-1)                  # (B, T, 9e)

    def forward(self, ctx: ContextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        items = self.item_proj(self.item_features(ctx))                              # (B, T, d_out)
        prof = self.profile_proj(self.profile(ctx.profile + self.field_offset))     # (B, P, d_out)
        tokens = torch.cat([prof, items], dim=1)                                     # (B, N, d_out)
        mask = torch.cat([torch.ones_like(ctx.profile, dtype=torch.bool), ctx.mask], dim=1)
        return tokens, mask


class ContextProcessor(nn.Module):
    """Eqs. (1)-(4): context tokens -> [(k_l, v_l) for l < L_kv]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ContextEmbedder(cfg, cfg.d_context)
        width = cfg.g_kv * cfg.d_head
        self.k_norms = nn.ModuleList(RMSNorm(width, eps=1e-6) for _ in range(cfg.l_kv))
        self.v_norms = nn.ModuleList(RMSNorm(width, eps=1e-6) for _ in range(cfg.l_kv if cfg.s_kv == 2 else 0))

    def forward(self, ctx: ContextBatch) -> ContextKV:
        cfg = self.cfg
        tokens, mask = self.embed(ctx)                                   # (B, N, d_context)
        b, n, _ = tokens.shape
        chunks = tokens.split(cfg.g_kv * cfg.d_head, dim=-1)             # eq. (2): S_kv * L_kv chunks
        def heads(x: torch.Tensor) -> torch.Tensor:          # (B, N, G*dh) -> (B, G, N, dh)
            return x.view(b, n, cfg.g_kv, cfg.d_head).transpose(1, 2)

        pairs = []
        for layer in range(cfg.l_kv):
            k = heads(self.k_norms[layer](chunks[layer * cfg.s_kv]))                                   # eq. (3)
            v = heads(self.v_norms[layer](chunks[layer * cfg.s_kv + 1])) if cfg.s_kv == 2 else k     # eq. (4)
            pairs.append((k, v))
        return ContextKV(pairs, None if bool(mask.all()) else mask)
