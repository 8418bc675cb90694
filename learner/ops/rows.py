"""Row gathers and row norms of the context processor: embedding look-ups and RMSNorm.

Invariant: each op has one entry point with a reference path (torch's own `F.embedding`,
`F.rms_norm`: the definition) and a fast path that computes the same values and gradients with
fewer passes over memory; `impl="reference"` selects the reference, tests compare the two.

Why the fast paths (CPU, tiny preset, batch 256, one thread): the context processor reads
B x T x 9 embedding rows and normalizes B x N x d_context keys; both are memory-bound.
- `gather_rows` backward accumulates with `index_put_(accumulate=True)`, about 3x faster on CPU
  than `embedding_dense_backward` (which sorts the indices first).
- `rms_norm` is one autograd node (forward 3 passes, backward 6) instead of the 6 nodes of the
  decomposed norm, 2-3x faster forward + backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_IMPLS = ("fast", "reference")


def _check_impl(impl: str) -> None:
    if impl not in ROW_IMPLS:
        raise ValueError(f"impl: must be one of {ROW_IMPLS}, got {impl!r}")


def gather_rows(table: torch.Tensor, index: torch.Tensor, *, impl: str = "fast") -> torch.Tensor:
    """table (R, e) float, index (...) int64 in [0, R) -> (..., e): `F.embedding(index, table)`."""
    _check_impl(impl)
    if table.dim() != 2 or index.dtype != torch.long:
        raise ValueError(f"gather_rows: table must be 2-D (R, e) and index int64; got {tuple(table.shape)}, "
                         f"{index.dtype}")
    if impl == "reference" or not (torch.is_grad_enabled() and table.requires_grad):
        return F.embedding(index, table)
    return _GatherRows.apply(table, index)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.n_rows = table.shape[0]
        return F.embedding(index, table)                                 # (..., e)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        e = grad_out.shape[-1]
        grad = grad_out.new_zeros(ctx.n_rows, e)                         # (R, e)
        grad.index_put_((index.reshape(-1),), grad_out.reshape(-1, e), accumulate=True)
        return grad, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: str = "fast") -> torch.Tensor:
    """x (..., d), weight (d,) -> x / sqrt(mean(x^2) + eps) * weight, in x's dtype."""
    _check_impl(impl)
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if impl == "reference" or x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.float64) \
            or torch.is_autocast_enabled(x.device.type):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        xhat = x * rstd                                                  # (..., d)
        grad_w = (grad_y * xhat).reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        grad_xhat = grad_y * weight
        dot = (grad_xhat * xhat).sum(-1, keepdim=True).div_(d)           # (..., 1)
        grad_x = grad_xhat.sub_(xhat.mul_(dot)).mul_(rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None


class RMSNorm(torch.nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and state-dict keys) computed by `rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)
