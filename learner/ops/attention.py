"""Attention ops of the lazy decoder and the baselines: one entry point per operation.

Invariant: every entry point checks its inputs (ValueError naming the op and the shapes) and then
runs the path that `attention_path` picks; `attention_path` is the only place that decides between
the pure-PyTorch reference (plain matmul + softmax: the definition, kept forever and compared
against in tests), torch's fused SDPA, and the Triton decode kernel (`learner.ops.decode_kernel`).

    impl = "sdpa" | "reference"     # what the model asks for (LazyDecoder.attn_impl)
    path = attention_path("self", impl, q, n_keys=k.shape[2])   # -> "reference" | "sdpa" | "triton_decode"

Ops (shapes in the docstrings):
- `cross_attention`       the lazy cross-attention with GQA, beams sharing one context (eqs. 6, 9)
- `causal_self_attention` the last Tq of Tk positions, causal (eq. 7)
- `cached_self_attention` one decode step: the new positions against a cache of earlier ones
- `attention`             plain multi-head attention with an optional mask (the baselines)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from learner.ops.decode_kernel import decode_self_attention

ATTN_IMPLS = ("sdpa", "reference")
PATHS = ("reference", "sdpa", "triton_decode")
DECODE_KERNEL_MAX_KEYS = 8      # the fused decode kernel loops over keys: meant for a handful
DECODE_KERNEL_MIN_ROWS = 32768  # (beams x heads) below which SDPA stays: there the call is launch-bound


def attention_path(op: str, impl: str, q: torch.Tensor, *, n_keys: int = 0,
                   kv: tuple[torch.Tensor, ...] = ()) -> str:
    """The one dispatch decision: which kernel serves `op` ("cross", "self", "plain") for `impl`.

    The Triton decode kernel serves "self" with impl "sdpa" when: CUDA, one query, 1 ..
    DECODE_KERNEL_MAX_KEYS keys in all, at least DECODE_KERNEL_MIN_ROWS rows B x H (below that its
    launch costs more than SDPA's GPU time), one float dtype, nothing to differentiate (it has no
    backward). Everything else (CPU included) runs SDPA, or the reference when asked for it.
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl: must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "reference":
        return "reference"
    if op == "self" and _decode_kernel_applies(q, n_keys, kv):
        return "triton_decode"
    return "sdpa"


def _decode_kernel_applies(q: torch.Tensor, n_keys: int, kv: tuple[torch.Tensor, ...]) -> bool:
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return (q.is_cuda and q.dim() == 4 and q.shape[2] == 1 and 1 <= n_keys <= DECODE_KERNEL_MAX_KEYS
            and q.shape[0] * q.shape[1] >= DECODE_KERNEL_MIN_ROWS
            and q.dtype in floats and all(t.dtype == q.dtype for t in kv)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *kv))))


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
    if attention_path("cross", impl, q) == "reference":
        kr = k.repeat_interleave(r, dim=1)                                   # (B, H, N, dh)
        vr = v.repeat_interleave(r, dim=1)
        qb = q.view(b, w, t, h, dh)
        scores = torch.einsum("bwthd,bhnd->bwthn", qb, kr) / math.sqrt(dh)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, None, :], float("-inf"))
        out = torch.einsum("bwthn,bhnd->bwthd", scores.softmax(-1), vr)
        return out.reshape(bw, t, h, dh)
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
    if attention_path("plain", impl, q) == "reference":
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str = "sdpa") -> torch.Tensor:
    """q (B, H, Tq, dh) are the last Tq of the Tk positions in k, v (B, H, Tk, dh) -> (B, H, Tq, dh)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[2] > k.shape[2]:
        raise ValueError(f"causal_self_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    tq, tk = q.shape[2], k.shape[2]
    path = attention_path("self", impl, q, n_keys=tk, kv=(k, v))
    if path == "triton_decode":
        return decode_self_attention(q, k[:, :, :-1], v[:, :, :-1], k[:, :, -1:], v[:, :, -1:])
    # position i of q is position tk - tq + i: it may see keys 0 .. tk - tq + i
    if path == "reference":
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def cached_self_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                          past: tuple[torch.Tensor, torch.Tensor] | None, *, impl: str = "sdpa",
                          keep_cache: bool = True) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Causal self-attention of new positions over a cache: q, k_new, v_new (B, H, T, dh), past
    (k, v) (B, H, T_past, dh) or None -> (out (B, H, T, dh), cache (k, v) with these T appended).

    keep_cache=False: the caller reads no later position; the decode kernel then skips building
    the concatenation and the returned cache is None."""
    if past is None:
        out = causal_self_attention(q, k_new, v_new, impl=impl)
        return out, (k_new, v_new) if keep_cache else None
    if len(past) != 2 or past[0].shape != past[1].shape or past[0].shape[:2] != q.shape[:2] \
            or past[0].shape[3:] != q.shape[3:]:
        raise ValueError(f"cached_self_attention: past must be (k, v) (B, H, T_past, dh) matching q "
                         f"{tuple(q.shape)}, got {[tuple(t.shape) for t in past]}")
    n_keys = past[0].shape[2] + k_new.shape[2]
    if attention_path("self", impl, q, n_keys=n_keys, kv=(*past, k_new, v_new)) == "triton_decode":
        out = decode_self_attention(q, past[0], past[1], k_new, v_new)      # no concatenation
        if not keep_cache:
            return out, None
        return out, (torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2))
    k, v = torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2)
    return causal_self_attention(q, k, v, impl=impl), ((k, v) if keep_cache else None)
