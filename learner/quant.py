"""Post-training quantization of the Linear layers for inference: int8 and FP8 (e4m3).

Invariant: quantization only replaces `nn.Linear` modules of a copy of the model (or, `inplace`, of a
model built to be served) by modules that
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

FP8 activation quantization on CUDA (amax per row -> scale -> cast) has two implementations:
`quantize_rows_reference` (plain torch ops, the definition: 7 kernels) and `quantize_rows_fused`
(one Triton kernel: one read of x, one write of the fp8 rows and scales), the default. Tests compare
the two. The modules of one quantized copy share a memo of their last activation quantization, so
Linears fed the very same tensor (SwiGLU's gate and up) quantize it once.

Which Linears run in fp8 (`Fp8Rule`). Per Linear on an H100 (GPU time, us, M = 32768 rows = 64
requests x 512 beams; bf16 GEMM | fp8 GEMM + fused quantization | + unfused quantization):
    K=640,  N=640   (cross_q/o, self_o)   46 |  35 + 22 |  35 + 191
    K=640,  N=1920  (qkv, gate, up)      118 |  92 + 22 |  92 + 191
    K=1920, N=640   (down)               112 |  73 + 64 |  73 + 531
    K=640,  N=8192  (heads)              504 | 377 + 23 | 377 + 203
With K = 640 the GEMMs are bound by their bf16 output, which fp8 does not shrink (1.3x at best), and
the quantization pass (2 bytes read + 1 written per input element) eats that; fp8 pays for wide
outputs (N >= 2K, the quantization shared or amortized). At 512 rows (one request) every call is
launch-bound: bf16 F.linear costs ~20-30 us of CPU, quantize + _scaled_mm ~85-150 us.
So `quantize_model(..., rule=)` keeps Linears with fewer than `rule.min_out_features` outputs as
they are (nn.Linear), and a fp8 Linear called with fewer than `rule.min_rows` rows computes one
F.linear in the input dtype with its fp8-rounded weight (the CPU emulation's function; that copy is
made on first use and costs 2 bytes per weight on top of the fp8 one). `Fp8Rule()` (the default)
quantizes every Linear and always runs fp8; `SERVING_FP8_RULE` is what bench/generate.py serves.
"""
from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MODES = ("int8_weight", "int8_dynamic", "fp8")
FP8_ALIGN = 16               # torch._scaled_mm: inner and output dimensions multiples of 16
ACTIVATION_KERNELS = ("fused", "reference")


@dataclass(frozen=True)
class Fp8Rule:
    """Where fp8 runs: Linears with >= min_out_features outputs, called with >= min_rows rows."""
    min_out_features: int = 0
    min_rows: int = 0


# measured on an H100 (0.1B, beam 512; the per-Linear numbers in the module docstring): fp8 for the
# wide layers (qkv, gate / up, heads), and only in calls of >= 16384 rows (32 requests x 512 beams)
SERVING_FP8_RULE = Fp8Rule(min_out_features=1024, min_rows=16384)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """(out, in) -> (out, 1) float32 scale so that |w / scale| <= qmax."""
    return (w.detach().float().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)


# ----------------------------------------------------------------------------- fp8 activations
def quantize_rows_reference(flat: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> fp8 rows (M, k_pad), zero-padded, and float32 scales (M, 1): x ~ x_q * scale."""
    if k_pad > flat.shape[1]:
        flat = F.pad(flat, (0, k_pad - flat.shape[1]))                            # (M, k_pad)
    x_scale = (flat.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # (M, 1)
    return (flat / x_scale).to(FP8), x_scale


@functools.cache
def _fused_row_quantizer():
    """The Triton kernel, built on first CUDA use (Triton ships with CUDA builds of torch only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, n_cols_padded, x_row_stride,
                             BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, N_CHUNKS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)          # (R,)
        row_ok = rows[:, None] < n_rows                                          # (R, 1)
        cols = tl.arange(0, BLOCK_COLS)[None, :]                                 # (1, C)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * x_row_stride
        q_rows = q_ptr + rows[:, None].to(tl.int64) * n_cols_padded
        if N_CHUNKS == 1:                              # the whole row in registers: x is read once
            x = tl.load(x_rows + cols, mask=row_ok & (cols < n_cols), other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)         # (R,)
            tl.store(q_rows + cols, (x / scale[:, None]).to(tl.float8e4nv), mask=row_ok & (cols < n_cols_padded))
        else:                                          # wide rows: amax over chunks, then a second pass
            amax = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for i in tl.static_range(N_CHUNKS):
                c = i * BLOCK_COLS + cols
                x = tl.load(x_rows + c, mask=row_ok & (c < n_cols), other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            scale = tl.maximum(amax / 448.0, 1e-12)
            for i in tl.static_range(N_CHUNKS):
                c = i * BLOCK_COLS + cols
                x = tl.load(x_rows + c, mask=row_ok & (c < n_cols), other=0.0).to(tl.float32)
                tl.store(q_rows + c, (x / scale[:, None]).to(tl.float8e4nv), mask=row_ok & (c < n_cols_padded))
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)

    def launch(flat: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = flat.shape
        x_q = torch.empty(m, k_pad, device=flat.device, dtype=FP8)                 # (M, k_pad)
        x_scale = torch.empty(m, 1, device=flat.device, dtype=torch.float32)      # (M, 1)
        if m == 0:
            return x_q, x_scale
        block_cols = min(triton.next_power_of_2(k_pad), 4096)
        block_rows = max(1, 8192 // block_cols)                                   # ~8k elements a program
        quantize_rows_kernel[(triton.cdiv(m, block_rows),)](
            flat, x_q, x_scale, m, k, k_pad, flat.stride(0),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, N_CHUNKS=triton.cdiv(k_pad, block_cols), num_warps=8)
        return x_q, x_scale

    return launch


def quantize_rows_fused(flat: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_reference` in one Triton kernel (CUDA tensors only)."""
    if not flat.is_cuda:
        raise ValueError(f"quantize_rows_fused: needs a CUDA tensor, got one on {flat.device}")
    if flat.dim() != 2 or k_pad < flat.shape[1]:
        raise ValueError(f"quantize_rows_fused: flat must be 2-D (M, K <= k_pad={k_pad}), got {tuple(flat.shape)}")
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    return _fused_row_quantizer()(flat, k_pad)


class ActivationMemo:
    """The last activation quantization of one quantized copy: a Linear fed the very tensor (same
    object, same version) that the previous one quantized reuses its fp8 rows. Holds the input by
    weak reference only, so a freed tensor can never be mistaken for a new one at the same address."""

    def __init__(self):
        self._last = None        # (weakref to x, x._version, k_pad, kernel, (x_q, x_scale))

    def quantize(self, x: torch.Tensor, k_pad: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., K) -> fp8 rows (M, k_pad) and scales (M, 1) of x.reshape(-1, K)."""
        last = self._last
        if last is not None and last[0]() is x and last[1:4] == (x._version, k_pad, kernel):
            return last[4]
        quantize = quantize_rows_fused if kernel == "fused" else quantize_rows_reference
        result = quantize(x.reshape(-1, x.shape[-1]), k_pad)
        self._last = (weakref.ref(x), x._version, k_pad, kernel, result)
        return result


# ----------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """A bias-free or biased Linear with quantized weights; see the module docstring for modes.

    fp8 only: `activation_kernel` ("fused" or "reference") picks the CUDA activation quantization;
    calls with fewer than `min_rows` rows compute with the fp8-rounded weight in the input dtype."""

    def __init__(self, linear: nn.Linear, mode: str, *, min_rows: int = 0, activation_kernel: str = "fused",
                 memo: ActivationMemo | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
        if min_rows < 0:
            raise ValueError(f"min_rows: must be >= 0, got {min_rows}")
        if activation_kernel not in ACTIVATION_KERNELS:
            raise ValueError(f"activation_kernel: must be one of {ACTIVATION_KERNELS}, got {activation_kernel!r}")
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows = min_rows
        self.activation_kernel = activation_kernel
        self.memo = memo if memo is not None else ActivationMemo()
        self._rounded_weight = None          # fp8 small-row path: (out, in) weight in the input dtype
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
            rows = x.numel() // self.in_features
            if rows >= self.min_rows:
                return self._fp8_cuda(x)
            return F.linear(x, self._small_rows_weight(x), self.bias)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _small_rows_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The fp8-rounded weight in x's dtype and device, made once (below min_rows the GEMM is
        launch-bound: one F.linear beats quantize + _scaled_mm)."""
        w = self._rounded_weight
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self._rounded_weight = self.dequantized_weight(x.dtype).contiguous()
        return w

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
        x_q, x_scale = self.memo.quantize(x, self.weight_q.shape[1], self.activation_kernel)  # (M, ceil16(in))
        y = torch._scaled_mm(x_q, self.weight_q.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                             out_dtype=torch.bfloat16)                              # (M, ceil16(out))
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rows = f", min_rows={self.min_rows}" if self.mode == "fp8" and self.min_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{rows}"


def quantize_model(model: nn.Module, mode: str, *, skip: tuple[str, ...] = (), rule: Fp8Rule = Fp8Rule(),
                   activation_kernel: str = "fused", inplace: bool = False) -> nn.Module:
    """A copy of model with every nn.Linear (except names starting with one of `skip`, and for fp8
    those narrower than rule.min_out_features) quantized. activation_kernel: fp8 on CUDA only.
    inplace=True replaces the Linears of `model` itself (no copy: for a model built to be served;
    the original Linear weights are only read, so they may be read-only views)."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    if activation_kernel not in ACTIVATION_KERNELS:
        raise ValueError(f"activation_kernel: must be one of {ACTIVATION_KERNELS}, got {activation_kernel!r}")
    quantized = (model if inplace else copy.deepcopy(model)).eval()
    memo = ActivationMemo()
    for name, module in list(quantized.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or any(full.startswith(s) for s in skip):
                continue
            if mode == "fp8" and child.out_features < rule.min_out_features:
                continue
            setattr(module, child_name, QuantizedLinear(child, mode, min_rows=rule.min_rows if mode == "fp8" else 0,
                                                        activation_kernel=activation_kernel, memo=memo))
    return quantized


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (the quantized weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ----------------------------------------------------------------------------- serving dtypes
SERVING_DTYPES = ("fp32", "bf16", "int8", "fp8")    # serve.dtype


def serving_dtype_support(dtype: str, device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(fast, why) for serving in `dtype` on `device`: the one place that reads the CPU's kind.

    On the CPU: bf16 is fast with AVX-512 BF16 or AMX (torch.backends.cpu.get_cpu_capability() names
    the dispatch level, AVX2 / AVX512, and torch.cpu's feature flags the BF16 / VNNI extensions);
    without them it works, but every bf16 matmul is emulated (~40x slower than fp32 on AVX2). int8
    (`torch._int_mm`) is fast with VNNI and works everywhere. fp8 serves on CUDA only (on the CPU it is
    an emulation that dequantizes every call). On CUDA every dtype is fast but int8 (fp8 and bf16 use the
    tensor cores; int8 works, unmeasured here)."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype: must be one of {SERVING_DTYPES}, got {dtype!r}")
    if torch.device(device).type == "cuda":
        return dtype != "int8", "cuda"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())
             for name in ("avx512_bf16", "amx_tile", "vnni")}
    kind = f"cpu {capability}" + "".join(f" +{name}" for name, on in flags.items() if on)
    if dtype == "bf16":
        return flags["avx512_bf16"] or flags["amx_tile"], kind
    if dtype == "int8":
        return flags["vnni"] or flags["amx_tile"], kind
    if dtype == "fp8":
        return False, kind
    return True, kind


def prepare_for_serving(model: nn.Module, dtype: str, device: str | torch.device = "cpu") -> nn.Module:
    """`model` (float32, any device) as served in `dtype` on `device`, converted in place: fp32 moved,
    bf16 cast (every floating tensor is a new one), int8 = per-row dynamic int8 Linears
    ("int8_dynamic"), fp8 = bf16 with SERVING_FP8_RULE's Linears in fp8 (CUDA only)."""
    device = torch.device(device)
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype: must be one of {SERVING_DTYPES}, got {dtype!r}")
    if dtype == "fp8" and device.type != "cuda":
        raise ValueError("dtype fp8 serves on CUDA only (on the CPU it is a slow emulation): use fp32, bf16 or int8")
    model = model.to(device).eval()
    if dtype == "bf16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        return quantize_model(model, "int8_dynamic", inplace=True)
    if dtype == "fp8":
        return quantize_model(model.to(torch.bfloat16), "fp8", rule=SERVING_FP8_RULE, inplace=True)
    return model
