"""Post-training quantization: quantized logits stay close, beam search still works, weights shrink."""
import numpy as np
import pytest
import torch

from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.quant import (ActivationMemo, Fp8Rule, QuantizedLinear, quantize_model, quantize_rows_fused,
                           quantize_rows_reference, weight_bytes)
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=16, max_short=6, max_long=10, item_hash_buckets=256,
                                           d_model=128, n_heads=4)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    item_ids, _, tok = random_catalogue(120, codebook_size=16, seed=7)
    model = LazyDecoder(CFG).eval()
    rng = np.random.default_rng(0)
    ctx = build_context_batch([random_context(rng, CFG, item_ids) for _ in range(4)], tok, CFG)
    targets = torch.from_numpy(tok.codes_for(item_ids[:4]))
    return model, tok, ctx, targets


@pytest.mark.parametrize("mode,tol", [("int8_weight", 0.02), ("int8_dynamic", 0.05), ("fp8", 0.1)])
def test_quantized_logits_stay_close(setup, mode, tol):
    model, tok, ctx, targets = setup
    q = quantize_model(model, mode)
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        ref, out = model(ctx, targets), q(ctx, targets)
    rel = (out - ref).norm() / ref.norm()
    assert rel < tol, float(rel)
    # the quantized copy serves: beam search over it returns valid distinct items
    recs = beam_search(q, ctx, tok.trie(), beam_width=16, top_k=5)
    assert all(len(set(r)) == 5 and set(r) <= set(tok.item_ids.tolist()) for r in recs.item_ids.tolist())
    # and the original is untouched
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_quantized_linear_matches_dequantized_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=True)
    x = torch.randn(5, 64)
    for mode in ("int8_weight", "fp8"):
        q = QuantizedLinear(lin, mode)
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized_weight(x.dtype), lin.bias))
        assert (q.dequantized_weight(torch.float32) - lin.weight).abs().max() <= q.weight_scale.max() * (
            0.5 if mode == "int8_weight" else 32)


def test_weights_shrink_and_bad_mode_raises(setup):
    model = setup[0]
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    saved = weight_bytes(model) - weight_bytes(quantize_model(model, "fp8"))
    assert saved > 0.7 * linear_bytes
    with pytest.raises(ValueError, match="mode"):
        quantize_model(model, "int4")


def test_fp8_rule_keeps_narrow_linears_in_full_precision(setup):
    model, tok, ctx, targets = setup
    widths = sorted({m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
    cut = widths[len(widths) // 2]
    q = quantize_model(model, "fp8", rule=Fp8Rule(min_out_features=cut, min_rows=8))
    kept = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    assert kept and quantized
    assert all(m.out_features < cut for m in kept) and all(m.out_features >= cut for m in quantized)
    assert all(m.min_rows == 8 for m in quantized)
    with torch.no_grad():
        ref, out = model(ctx, targets), q(ctx, targets)
    assert float((out - ref).norm() / ref.norm()) < 0.1
    # int8 modes ignore the fp8 rule
    int8 = quantize_model(model, "int8_weight", rule=Fp8Rule(min_out_features=10 ** 6))
    assert sum(isinstance(m, QuantizedLinear) for m in int8.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in model.modules())


def test_activation_memo_reuses_only_the_same_unchanged_tensor():
    torch.manual_seed(0)
    memo = ActivationMemo()
    x = torch.randn(2, 3, 40)
    first = memo.quantize(x, 48, "reference")
    x_q, x_scale = first
    assert x_q.shape == (6, 48) and x_scale.shape == (6, 1)
    ref_q, ref_scale = quantize_rows_reference(x.reshape(6, 40), 48)
    assert torch.equal(x_q.float(), ref_q.float()) and torch.equal(x_scale, ref_scale)
    assert memo.quantize(x, 48, "reference") is first                    # the same tensor: reused
    assert memo.quantize(x.clone(), 48, "reference") is not first         # an equal copy: recomputed
    x.mul_(2.0)                                                             # changed in place: recomputed
    again = memo.quantize(x, 48, "reference")
    assert again is not first
    torch.testing.assert_close(again[1], 2 * x_scale)


def test_fp8_options_are_checked():
    lin = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="min_rows"):
        QuantizedLinear(lin, "fp8", min_rows=-1)
    with pytest.raises(ValueError, match="activation_kernel"):
        quantize_model(torch.nn.Sequential(lin), "fp8", activation_kernel="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        quantize_rows_fused(torch.randn(3, 8), 16)
