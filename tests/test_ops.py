"""learner.ops: each fast path against its reference (outputs and gradients, random shapes), the one
dispatch decision, the bf16 decision, and the allocator setting."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.config import ModelConfig
from learner.context import ContextEmbedder
from learner.features import build_context_batch
from learner.ops import attention as attention_module
from learner.ops import (attention_path, autocast_dtype, cached_self_attention, causal_self_attention,
                         cpu_has_native_bf16, cross_attention, precision)
from learner.ops.memory import retain_freed_memory
from learner.ops.rows import RMSNorm, gather_rows, rms_norm
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)


def grads(fn, *inputs):
    out = fn(*inputs)
    return out, torch.autograd.grad(out.square().sum(), inputs)


# ------------------------------------------------------------------------------------------ dispatch
def test_dispatch_is_decided_in_attention_path():
    q = torch.randn(4, 2, 1, 8)
    assert attention_path("self", "reference", q, n_keys=2) == "reference"
    assert attention_path("cross", "sdpa", q) == "sdpa"
    assert attention_path("self", "sdpa", q, n_keys=2) == "sdpa"
    with pytest.raises(ValueError, match="impl: must be one of"):
        attention_path("self", "flash", q, n_keys=2)
    with pytest.raises(ValueError, match="impl: must be one of"):
        cross_attention(torch.randn(1, 3, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), None, impl="x")


def test_decode_kernel_is_never_chosen_on_cpu(monkeypatch):
    """Thresholds lowered to any size: a CPU tensor still takes SDPA (the Triton kernel is CUDA only)."""
    monkeypatch.setattr(attention_module, "DECODE_KERNEL_MIN_ROWS", 1)
    q = torch.randn(4, 2, 1, 8)
    assert attention_path("self", "sdpa", q, n_keys=3, kv=(q, q)) == "sdpa"
    if torch.cuda.is_available():
        qc = q.cuda()
        with torch.no_grad():
            assert attention_path("self", "sdpa", qc, n_keys=3, kv=(qc, qc)) == "triton_decode"
            assert attention_path("self", "sdpa", qc, n_keys=attention_module.DECODE_KERNEL_MAX_KEYS + 1) == "sdpa"


def test_entry_points_name_the_op_on_bad_shapes():
    with pytest.raises(ValueError, match="cross_attention: mask must be"):
        cross_attention(torch.randn(2, 3, 4, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.ones(2, 4).bool())
    with pytest.raises(ValueError, match="causal_self_attention: bad shapes"):
        causal_self_attention(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    with pytest.raises(ValueError, match="cached_self_attention: past must be"):
        q = torch.randn(2, 2, 1, 8)
        cached_self_attention(q, q, q, (torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)))
    with pytest.raises(ValueError, match="gather_rows: table must be 2-D"):
        gather_rows(torch.randn(4, 2), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="rms_norm: weight must be"):
        rms_norm(torch.randn(3, 8), torch.ones(4), 1e-6)


# ------------------------------------------------------------------------------------------ attention
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.sampled_from([1, 2, 4]), t_past=st.integers(0, 3), t=st.integers(1, 3),
       keep=st.booleans(), impl=st.sampled_from(["sdpa", "reference"]), seed=st.integers(0, 1000))
def test_cached_self_attention_equals_attention_over_the_concatenation(b, h, t_past, t, keep, impl, seed):
    torch.manual_seed(seed)
    q, k_new, v_new = (torch.randn(b, h, t, 8, requires_grad=True) for _ in range(3))
    past = None if t_past == 0 else (torch.randn(b, h, t_past, 8), torch.randn(b, h, t_past, 8))
    out, cache = cached_self_attention(q, k_new, v_new, past, impl=impl, keep_cache=keep)
    k = k_new if past is None else torch.cat([past[0], k_new], 2)
    v = v_new if past is None else torch.cat([past[1], v_new], 2)
    want = causal_self_attention(q, k, v, impl="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert (cache is None) == (not keep)
    if keep:
        assert torch.equal(cache[0], k) and torch.equal(cache[1], v)


# ------------------------------------------------------------------------------------------ rows
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), e=st.integers(1, 24), n=st.integers(1, 300), lead=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_gather_rows_fast_path_matches_reference(rows, e, n, lead, seed):
    torch.manual_seed(seed)
    table = torch.randn(rows, e, requires_grad=True)
    index = torch.randint(0, rows, (lead, n))                            # repeats: gradients accumulate
    fast, g_fast = grads(lambda t: gather_rows(t, index), table)
    ref, g_ref = grads(lambda t: gather_rows(t, index, impl="reference"), table)
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)
    torch.testing.assert_close(g_fast[0], g_ref[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=0, max_size=3), d=st.integers(1, 80), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 1000))
def test_rms_norm_fast_path_matches_reference(shape, d, scale, seed):
    torch.manual_seed(seed)
    x = (scale * torch.randn(*shape, d)).requires_grad_()
    w = (1 + torch.randn(d)).requires_grad_()
    fast, g_fast = grads(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    ref, g_ref = grads(lambda a, b: rms_norm(a, b, 1e-6, impl="reference"), x, w)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * (1 + b.abs().max().item()), rtol=1e-4)


def test_rms_norm_module_keeps_nn_rmsnorm_state():
    ours, theirs = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_stacked_item_features_equal_one_lookup_per_feature():
    cfg = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=6, max_long=10, item_hash_buckets=512)
    item_ids, _, tok = random_catalogue(100, codebook_size=8, seed=1)
    rng = np.random.default_rng(0)
    ctx = build_context_batch([random_context(rng, cfg, item_ids) for _ in range(5)], tok, cfg)
    torch.manual_seed(0)
    embed = ContextEmbedder(cfg, 32)
    params = [p for p in embed.parameters() if p.requires_grad]
    fast = embed.item_features(ctx)
    g_fast = torch.autograd.grad(fast.square().sum(), params, allow_unused=True)
    ref = embed.item_features_reference(ctx)
    g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ precision, memory
def test_bf16_is_chosen_from_the_reported_cpu_only(monkeypatch):
    cpu_has_native_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert not cpu_has_native_bf16() and autocast_dtype("cpu") is None
        assert autocast_dtype("cuda") == torch.bfloat16
    finally:
        cpu_has_native_bf16.cache_clear()
    monkeypatch.undo()
    flags = ""
    if precision.os_has_cpuinfo():
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    native = any(f in flags.split() for f in precision.CPU_BF16_FLAGS)
    if torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) and precision.os_has_cpuinfo():
        assert cpu_has_native_bf16() == native
    else:
        assert not cpu_has_native_bf16()
    assert (autocast_dtype("cpu") == torch.bfloat16) == cpu_has_native_bf16()


def test_retain_freed_memory_is_idempotent():
    first = retain_freed_memory()
    assert isinstance(first, bool) and retain_freed_memory() == first
