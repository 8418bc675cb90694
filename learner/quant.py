"""Post-training quantization of the Linear layers for inference: int8 and FP8 (e4m3).

Invariant: quantization only replaces `nn.Linear` modules of a copy of the model by modules that
compute the same function up to rounding of weights (and, for the dynamic modes, of activations);
embeddings, norms, the MoE expert tensors and the context processor's (k, v) stay as they are, so
beam search, the trie and logprobs work unchanged on the quantized copy.

Modes (per output channel weight scales everywhere):
- "int8_weight": int8 weights, dequantized to the activation dtype in forward (memory / bandwidth).
- "int8_dynamic": int8 weights and per-row int8 activations, integer matmul (`torch._int_mm`)
  with int32 accumulation, rescaled to float.
- "fp8": float8_e4m3fn weights (scale = row amax / 448, as in the OneRec FP8 work). On CUDA the
  activations are quantized per row and multiplied with `torch._scaled_mm` (row-wise scales,
  bf16 output); elsewhere the weights are dequantized (an emulation with the same rounding of
  weights, used by the CPU tests).

`torch._scaled_mm` needs both dimensions of its weight operand to be multiples of 16: fp8 weights
are stored zero-padded to (ceil16(out), ceil16(in)) (padded scales are 1), the CUDA path pads the
activations' inner dimension with zeros and drops the padded output columns, so the result is the
same function; `dequantized_weight` returns the (out, in) part.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MODES = ("int8_weight", "int8_dynamic", "fp8")
FP8_ALIGN = 16               # torch._scaled_mm: inner and output dimensions multiples of 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """(out, in) -> (out, 1) float32 scale so that |w / scale| <= qmax."""
    return (w.detach().float().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)


class QuantizedLinear(nn.Module):
    """A bias-free or biased Linear with quantized weights; see the module docstring for modes."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if mode == "fp8":
            scale = _row_scale(w, FP8_MAX)
            n_pad, k_pad = _round_up(self.out_features, FP8_ALIGN), _round_up(self.in_features, FP8_ALIGN)
            padded = torch.zeros(n_pad, k_pad, device=w.device)                   # (ceil16(out), ceil16(in))
            padded[: self.out_features, : self.in_features] = w.float() / scale
            scale = torch.cat([scale, scale.new_ones(n_pad - self.out_features, 1)])
            self.register_buffer("weight_q", padded.to(FP8))
        else:
            scale = _row_scale(w, 127.0)
            self.register_buffer("weight_q", torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)             # (out, 1) float32; fp8: (ceil16(out), 1)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight as this module rounds it (without the fp8 padding)."""
        w = (self.weight_q.float() * self.weight_scale).to(dtype)
        return w[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8_dynamic":
            return self._int8_dynamic(x)
        if self.mode == "fp8" and x.is_cuda:
            return self._fp8_cuda(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _int8_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()                                   # (M, in)
        x_scale = (flat.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)  # (M, 1)
        x_q = torch.round(flat / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(x_q, self.weight_q.t())                              # (M, out) int32
        y = acc.float() * x_scale * self.weight_scale.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _fp8_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row fp8 activations x fp8 weights on the tensor cores, bf16 out, then x.dtype."""
        shape = x.shape
        flat = x.reshape(-1, self.in_features)                                      # (M, in)
        k_pad = self.weight_q.shape[1] - self.in_features
        if k_pad:
            flat = F.pad(flat, (0, k_pad))                                          # (M, ceil16(in))
        x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # (M, 1)
        x_q = (flat / x_scale).to(FP8)
        y = torch._scaled_mm(x_q, self.weight_q.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                             out_dtype=torch.bfloat16)                              # (M, ceil16(out))
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_model(model: nn.Module, mode: str, *, skip: tuple[str, ...] = ()) -> nn.Module:
    """A copy of model with every nn.Linear (except names starting with one of `skip`) quantized."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    quantized = copy.deepcopy(model).eval()
    for name, module in list(quantized.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(full.startswith(s) for s in skip):
                setattr(module, child_name, QuantizedLinear(child, mode))
    return quantized


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (the quantized weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
