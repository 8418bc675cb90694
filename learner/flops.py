"""Analytic FLOPs per sample of the three architectures (report Appendix B), and counted FLOPs.

Invariant: the analytic numbers count exactly the matrix products our modules run (2 FLOPs per
multiply-add, embedding lookups and elementwise ops free), so on small configs they equal
`torch.utils.flop_counter.FlopCounterMode` run on the reference attention path (the fused CPU
attention kernel is invisible to the counter). Training = 3 x forward (backward computes input and
weight gradients: 2 x forward), the factor 6 = 2 x 3 of eqs. (22)-(29).

Unlike Appendix B, which ignores attention scores and divides the context by k = 5 impressions
per request ("common context compression"), `*_forward_flops` count scores and charge one full
context per sample; `appendix_b_gflops` gives the report's own formulas for comparison.
"""
from __future__ import annotations

from typing import Callable

from learner.config import N_ITEM_FEATURES, ModelConfig

GIGA = 1e9


def _split(cfg: ModelConfig, n_context: int) -> tuple[int, int]:
    """Context length N -> (profile tokens P, item tokens T = N - P)."""
    if n_context < cfg.profile_fields:
        raise ValueError(f"n_context: {n_context} is shorter than the {cfg.profile_fields} profile tokens")
    return cfg.profile_fields, n_context - cfg.profile_fields


def context_embedder_flops(cfg: ModelConfig, n_context: int, d_out: int) -> int:
    p, t = _split(cfg, n_context)
    return 2 * t * N_ITEM_FEATURES * cfg.embed_dim * d_out + 2 * p * cfg.embed_dim * d_out


def ffn_flops(cfg: ModelConfig, layer: int, tokens: int) -> int:
    d = cfg.d_model
    if not cfg.is_moe_layer(layer):
        return 6 * tokens * d * cfg.d_ff
    per_token = 2 * d * cfg.n_experts + 6 * d * cfg.moe_d_ff * (cfg.n_shared_experts + cfg.moe_top_k)
    return tokens * per_token


def lazy_forward_flops(cfg: ModelConfig, n_context: int) -> dict[str, int]:
    """Forward FLOPs of one sample: context of n_context tokens, 3 target tokens (eqs. 1-9)."""
    d, da, t = cfg.d_model, cfg.d_attn, 3
    out = {"context": context_embedder_flops(cfg, n_context, cfg.d_context)}
    out["cross_proj"] = cfg.n_layers * 2 * t * d * da * 2                 # W_q, W_o only
    out["cross_scores"] = cfg.n_layers * 4 * t * n_context * da            # QK^T and AV
    out["self_proj"] = cfg.n_layers * 2 * t * d * da * 4
    out["self_scores"] = cfg.n_layers * 4 * t * t * da
    out["ffn"] = sum(ffn_flops(cfg, layer, t) for layer in range(cfg.n_layers))
    out["heads"] = 3 * 2 * d * cfg.codebook_size
    out["total"] = sum(out.values())
    return out


def encoder_decoder_forward_flops(cfg: ModelConfig, n_context: int, *, n_encoder: int,
                                  n_decoder: int) -> dict[str, int]:
    d, da, n, t = cfg.d_model, cfg.d_attn, n_context, 3
    out = {"context": context_embedder_flops(cfg, n, d)}
    out["encoder"] = n_encoder * (2 * n * d * da * 4 + 4 * n * n * da + 6 * n * d * cfg.d_ff)
    out["cross_kv_proj"] = n_decoder * 2 * n * d * da * 2                  # the K/V projections of the context
    out["decoder"] = n_decoder * (2 * t * d * da * 4 + 4 * t * t * da       # self-attention
                                  + 2 * t * d * da * 2 + 4 * t * n * da     # cross W_q, W_o and scores
                                  + 6 * t * d * cfg.d_ff)
    out["heads"] = 3 * 2 * d * cfg.codebook_size
    out["total"] = sum(out.values())
    return out


def naive_forward_flops(cfg: ModelConfig, n_context: int, *, n_layers: int) -> dict[str, int]:
    d, da, s = cfg.d_model, cfg.d_attn, n_context + 3
    out = {"context": context_embedder_flops(cfg, n_context, d)}
    out["blocks"] = n_layers * (2 * s * d * da * 4 + 4 * s * s * da + 6 * s * d * cfg.d_ff)
    out["heads"] = 3 * 2 * d * cfg.codebook_size
    out["total"] = sum(out.values())
    return out


def training_flops_per_sample(arch: str, cfg: ModelConfig, n_context: int, **layers: int) -> int:
    """3 x forward for "lazy", "encoder_decoder" (n_encoder, n_decoder) or "naive" (n_layers)."""
    forward = {"lazy": lazy_forward_flops, "encoder_decoder": encoder_decoder_forward_flops,
               "naive": naive_forward_flops}
    if arch not in forward:
        raise ValueError(f"arch: must be one of {sorted(forward)}, got {arch!r}")
    return 3 * forward[arch](cfg, n_context, **layers)["total"]


def generation_flops(cfg: ModelConfig, n_context: int, *, beams_per_level: tuple[int, int, int]) -> int:
    """Forward FLOPs of one beam-search request with the incremental self-attention cache.

    beams_per_level: how many rows feed level 0, 1, 2 (1, W1, W2); the context is processed once."""
    d, da = cfg.d_model, cfg.d_attn
    total = context_embedder_flops(cfg, n_context, cfg.d_context)
    for position, rows in enumerate(beams_per_level):
        per_token = 0
        for layer in range(cfg.n_layers):
            per_token += 2 * d * da * 2 + 4 * n_context * da                 # lazy cross-attention
            per_token += 2 * d * da * 4 + 4 * (position + 1) * da             # self-attention with cache
            per_token += ffn_flops(cfg, layer, 1)
        per_token += 2 * d * cfg.codebook_size                                # this level's head
        total += rows * per_token
    return total


def appendix_b_gflops(arch: str, *, params: float, n_context: int, impressions_per_context: int = 5,
                      cross_kv_fraction: float = 0.1) -> float:
    """The report's estimates, eqs. (22)-(29): 6 x params x tokens, context compressed N / k.

    encoder_decoder: params split 1:1; naive: all params see N/k + 3 tokens; lazy: 3 tokens."""
    n = n_context / impressions_per_context
    if arch == "encoder_decoder":
        half = params / 2
        return (6 * half * n + 6 * cross_kv_fraction * half * n + 6 * (1 - cross_kv_fraction) * half * 3) / GIGA
    if arch == "naive":
        return (6 * params * n + 6 * params * 3) / GIGA
    if arch == "lazy":
        return 6 * params * 3 / GIGA
    raise ValueError(f"arch: must be encoder_decoder, naive or lazy, got {arch!r}")


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's FlopCounterMode sees while fn() runs (run backward inside fn to count training)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
