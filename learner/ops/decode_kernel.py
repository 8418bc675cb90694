"""The fused decode self-attention kernel (Triton, CUDA only).

Invariant: `decode_self_attention(q, k_past, v_past, k_new, v_new)` computes exactly what
`causal_self_attention(q, cat([k_past, k_new], 2), cat([v_past, v_new], 2), impl="reference")`
computes for one new query per row (float32 scores, softmax and sums), without building the
concatenation and without autograd. Whether it runs is decided in `learner.ops.attention` only.

In beam search each level feeds one new token per beam whose query attends to at most 3 keys
(BOS, s1, s2); a generic attention kernel is launch- and memory-bound there, this one reads q, k,
v once. Measured figures are in the README ("Kernels").
"""
from __future__ import annotations

import functools
import math

import torch


def decode_self_attention(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor,
                          k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """One new position per row attends to the cached ones and itself, in one Triton kernel (CUDA).

    q, k_new, v_new (B, H, 1, dh); k_past, v_past (B, H, Tp, dh), any strides -> (B, H, 1, dh) in
    q's dtype.
    """
    b, h, _, dh = q.shape
    if (q.shape[2], k_new.shape, v_new.shape, v_past.shape) != (1, q.shape, q.shape, k_past.shape) \
            or k_past.shape[:2] != (b, h) or k_past.shape[3] != dh:
        raise ValueError(f"decode_self_attention: bad shapes q {tuple(q.shape)}, k_past {tuple(k_past.shape)}, "
                         f"k_new {tuple(k_new.shape)}")
    if not q.is_cuda:
        raise ValueError("decode_self_attention: the Triton kernel needs CUDA tensors")
    q, k_past, v_past, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous()
                                       for t in (q, k_past, v_past, k_new, v_new))
    out = torch.empty(b, h, 1, dh, device=q.device, dtype=q.dtype)              # (B, H, 1, dh)
    if b * h:
        _decode_attention_launcher()(q, k_past, v_past, k_new, v_new, out)
    return out


@functools.cache
def _decode_attention_launcher():
    """The Triton kernel, built on first CUDA use (Triton ships with CUDA builds of torch only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(q_ptr, kp_ptr, vp_ptr, kn_ptr, vn_ptr, out_ptr, n_rows, n_heads, d_head,
                                scale, sq_b, sq_h, skp_b, skp_h, skp_t, svp_b, svp_h, svp_t,
                                skn_b, skn_h, svn_b, svn_h, N_PAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)          # (R,) flat (b, h)
        bi = (rows // n_heads).to(tl.int64)
        hi = (rows % n_heads).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]                                       # (1, D)
        ok = (rows[:, None] < n_rows) & (d < d_head)                             # (R, D)
        q = tl.load(q_ptr + (bi * sq_b + hi * sq_h)[:, None] + d, mask=ok, other=0.0).to(tl.float32)
        k_new = tl.load(kn_ptr + (bi * skn_b + hi * skn_h)[:, None] + d, mask=ok, other=0.0).to(tl.float32)
        s_new = tl.sum(q * k_new, axis=1) * scale                                # (R,) the row's own key
        m = s_new
        for j in tl.static_range(N_PAST):                 # pass 1: the max score (unrolled: a few keys)
            k = tl.load(kp_ptr + (bi * skp_b + hi * skp_h + j * skp_t)[:, None] + d, mask=ok, other=0.0)
            m = tl.maximum(m, tl.sum(q * k.to(tl.float32), axis=1) * scale)
        # pass 2 (keys again, now from cache): as fused attention kernels do, the sum of p is float32
        # and p is rounded to the input dtype for p . v, so results match SDPA's to its rounding
        total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(N_PAST):
            k = tl.load(kp_ptr + (bi * skp_b + hi * skp_h + j * skp_t)[:, None] + d, mask=ok, other=0.0)
            v = tl.load(vp_ptr + (bi * svp_b + hi * svp_h + j * svp_t)[:, None] + d, mask=ok, other=0.0)
            p = tl.exp(tl.sum(q * k.to(tl.float32), axis=1) * scale - m)
            total += p
            acc += p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)
        v_new = tl.load(vn_ptr + (bi * svn_b + hi * svn_h)[:, None] + d, mask=ok, other=0.0)
        p = tl.exp(s_new - m)
        total += p
        acc += p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
        out = acc / total[:, None]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * d_head + d, out.to(out_ptr.dtype.element_ty), mask=ok)

    def launch(q, k_past, v_past, k_new, v_new, out):
        b, h, _, dh = q.shape
        n_rows = b * h
        block_d = triton.next_power_of_2(dh)
        block_rows = max(1, 4096 // block_d)                                      # ~4k elements a program
        decode_attention_kernel[(triton.cdiv(n_rows, block_rows),)](
            q, k_past, v_past, k_new, v_new, out, n_rows, h, dh, 1.0 / math.sqrt(dh),
            q.stride(0), q.stride(1), k_past.stride(0), k_past.stride(1), k_past.stride(2),
            v_past.stride(0), v_past.stride(1), v_past.stride(2),
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            N_PAST=k_past.shape[2], BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=4)

    return launch
