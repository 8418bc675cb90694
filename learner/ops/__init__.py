"""Numeric ops of the models: one entry point per operation, each with a pure-PyTorch reference.

Invariant: the choice of kernel is made in one function per concern: `attention_path` (reference,
SDPA or the Triton decode kernel) and `autocast_dtype` (bf16 or fp32 for a device). The decode
kernel's thresholds (DECODE_KERNEL_MAX_KEYS, DECODE_KERNEL_MIN_ROWS) live in `learner.ops.attention`,
and so does the baselines' plain `attention(q, k, v, allowed)` (not re-exported here: the name
`learner.ops.attention` stays the module).
"""
from learner.ops.attention import (ATTN_IMPLS, attention_path, cached_self_attention, causal_self_attention,
                                   cross_attention)
from learner.ops.decode_kernel import decode_self_attention
from learner.ops.precision import autocast_dtype, autocast_for, cpu_has_native_bf16

__all__ = ["ATTN_IMPLS", "attention_path",
           "autocast_dtype", "autocast_for", "cached_self_attention", "causal_self_attention", "cpu_has_native_bf16",
           "cross_attention", "decode_self_attention"]
