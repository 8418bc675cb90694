"""The lazy decoder (eqs. 5-10): 3 target tokens attend to a context processed once.

Invariant: compute per sample scales with the 3 target tokens, not with the context: the context
enters only as the (k, v) of the context processor, shared by every block in a kv-layer group
(eq. 9), by every query head in a G_kv group, and by every beam of a request.

Each attention op has one entry point with input checks and two paths: `"reference"` (plain
matmul + softmax, the definition) and `"sdpa"` (torch's fused scaled_dot_product_attention);
tests compare them. `LazyDecoder.attn_impl` selects the path.

Decode self-attention on CUDA (`decode_self_attention`, one Triton kernel): in beam search each
level feeds one new token per beam, whose query attends to at most 3 keys (BOS, s1, s2). torch's
SDPA runs that as a generic attention kernel. Measured on an H100 (0.1B, 64 requests x 512 beams,
q (32768, 10, 1, 64) bf16, GPU time per call): SDPA 1.62 ms for 2 or 3 keys, the kernel
0.087 / 0.116 ms (it reads q, k, v once). It reads the cached keys and the new key from separate
tensors, so the concatenated cache (0.35 / 0.52 ms per layer for k and v) is built only when a later
level reads it: not after beam search's last level. Beam search p50 (bf16, same run, H100):
batch 64 121 -> 79 ms, batch 16 41 -> 31 ms. At batch 1 (5120 beam x head rows) the kernel's launch
cost outweighed SDPA's GPU time (search 43 -> 47 ms), so calls of fewer than DECODE_KERNEL_MIN_ROWS
rows keep SDPA. The kernel runs for `"sdpa"` on CUDA, without autograd, with one query and at most
DECODE_KERNEL_MAX_KEYS keys per row; everything else (CPU included) takes the unchanged paths.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import ModelConfig
from learner.context import ContextKV, ContextProcessor
from learner.features import ContextBatch
from learner.moe import MoEFeedForward, SwiGLU

ATTN_IMPLS = ("sdpa", "reference")
DECODE_KERNEL_MAX_KEYS = 8      # the fused decode kernel loops over keys: meant for a handful
DECODE_KERNEL_MIN_ROWS = 32768  # (beams x heads) below which SDPA stays: there the call is launch-bound


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
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl: must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "sdpa" and decode_kernel_applies(q, k, v):
        return decode_self_attention(q, k[:, :, :-1], v[:, :, :-1], k[:, :, -1:], v[:, :, -1:])
    # position i of q is position tk - tq + i: it may see keys 0 .. tk - tq + i
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if impl == "reference":
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_self_attention` serves q (B, H, 1, dh) over all of k, v (B, H, Tk, dh): CUDA,
    one query, 1 .. DECODE_KERNEL_MAX_KEYS keys, at least DECODE_KERNEL_MIN_ROWS rows B x H, one float
    dtype, nothing to differentiate (the kernel has no backward)."""
    return (q.is_cuda and q.shape[2] == 1 and 1 <= k.shape[2] <= DECODE_KERNEL_MAX_KEYS
            and q.shape[0] * q.shape[1] >= DECODE_KERNEL_MIN_ROWS
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def decode_self_attention(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor,
                          k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """One new position per row attends to the cached ones and itself, in one Triton kernel (CUDA).

    q, k_new, v_new (B, H, 1, dh); k_past, v_past (B, H, Tp, dh), any strides -> (B, H, 1, dh) in
    q's dtype: what `causal_self_attention(q, cat([k_past, k_new], 2), cat([v_past, v_new], 2))`
    computes, with float32 scores, softmax and sums, without building the concatenation.
    """
    b, h, _, dh = q.shape
    if (q.shape[2], k_new.shape, v_new.shape, v_past.shape) != (1, q.shape, q.shape, k_past.shape) \
            or k_past.shape[:2] != (b, h) or k_past.shape[3] != dh:
        raise ValueError(f"decode_self_attention: bad shapes q {tuple(q.shape)}, k_past {tuple(k_past.shape)}, "
                         f"k_new {tuple(k_new.shape)}")
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
                past: tuple[torch.Tensor, torch.Tensor] | None, impl: str, keep_cache: bool = True):
        """h (B*W, T, d); past self-attn (k, v) (B*W, H, T_past, dh) or None -> (h, (k, v) incl. these T).

        keep_cache=False: the caller will not read the returned (k, v); the fused decode path then
        skips building it (it is returned on the other paths, which need it for their attention)."""
        bw, t, _ = h.shape
        q = self.cross_q(self.norm_cross(h)).view(bw, t, self.n_heads, self.d_head)
        x = cross_attention(q, k, v, mask, impl=impl).reshape(bw, t, -1)
        h = h + self.dropout(self.cross_o(x))                                     # eq. (6)
        qkv = self.self_qkv(self.norm_self(h)).view(bw, t, 3, self.n_heads, self.d_head)
        sq, sk, sv = qkv.permute(2, 0, 3, 1, 4)                                    # (B*W, H, T, dh) each
        if (past is not None and impl == "sdpa" and past[0].shape[2] < DECODE_KERNEL_MAX_KEYS
                and decode_kernel_applies(sq, *past)):
            x = decode_self_attention(sq, past[0], past[1], sk, sv)               # no concatenation
            if keep_cache:
                sk, sv = torch.cat([past[0], sk], dim=2), torch.cat([past[1], sv], dim=2)
        else:
            if past is not None:
                sk, sv = torch.cat([past[0], sk], dim=2), torch.cat([past[1], sv], dim=2)
            x = causal_self_attention(sq, sk, sv, impl=impl)
        x = x.transpose(1, 2).reshape(bw, t, -1)
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
