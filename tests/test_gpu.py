"""The CUDA paths: fp8 `_scaled_mm` linear, quantized model, decoder and beam search, the learner's
training step, and the serving replica's host -> device weight copy.

Invariant: on a GPU every path computes what the CPU path computes (fp32 reference, same weights),
up to the rounding of its dtype (bf16 autocast, fp8 activations); on a machine without CUDA every
test here is skipped (CI has no GPU), never run half-way. The learner test trains on the real
broker (the `broker` fixture, as everywhere); no test here needs Ray: they drive the actors'
plain classes (`OnlineLearner`, `ServingReplica`).
"""
import copy
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.ops import attention as model_module  # the dispatch and the decode kernel's thresholds
from learner.ops import causal_self_attention, decode_self_attention
from learner.quant import (FP8, FP8_MAX, Fp8Rule, QuantizedLinear, quantize_model, quantize_rows_fused,
                           quantize_rows_reference)
from learner.synthetic import random_catalogue, random_context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
CFG = ModelConfig.from_name("tiny").replace(codebook_size=16, max_short=6, max_long=10, item_hash_buckets=256,
                                           d_model=128, n_heads=4)
# in/out features of the context projection and the heads not multiples of 16 (the fp8 GEMM's constraint)
UNALIGNED = CFG.replace(embed_dim=15, codebook_size=20)
MOE = CFG.replace(n_experts=4, moe_top_k=2, moe_d_ff=64, n_shared_experts=1, first_dense_layers=1)


@pytest.fixture(scope="module")
def catalogue():
    return random_catalogue(120, codebook_size=16, seed=7)


def batch(cfg, catalogue, b=4, seed=0):
    item_ids, _, tok = catalogue
    rng = np.random.default_rng(seed)
    ctx = build_context_batch([random_context(rng, cfg, item_ids) for _ in range(b)], tok, cfg)
    return ctx, torch.from_numpy(tok.codes_for(item_ids[:b]))


def peaked(model: LazyDecoder) -> LazyDecoder:
    """Heads with larger weights: logits spread by several units, so the best items are not near-ties
    that bf16 rounding may reorder (a freshly initialised model is almost uniform)."""
    with torch.no_grad():
        for head in model.heads:
            head.weight.mul_(25.0)
    return model


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


BF16_ATOL = 0.15    # log pi(item) under bf16 autocast vs float32: 3 levels of log-softmax, rounded


def assert_same_ranking(got_items, got_logprobs, want_items, want_logprobs, atol=BF16_ATOL):
    """Per row: the same top-k logprobs within atol, and the same item wherever the float32 ranking
    is unambiguous (its logprob more than 2 x atol from its neighbours'); near-ties may swap. The
    last rank is not compared: its neighbour below (rank k + 1) is not known."""
    got_lp, want_lp = np.asarray(got_logprobs, dtype=np.float64), np.asarray(want_logprobs, dtype=np.float64)
    np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=atol)
    for row, (got, want, lp) in enumerate(zip(got_items, want_items, want_lp)):
        gaps = np.abs(np.diff(lp))
        for i in range(len(want) - 1):
            left = gaps[i - 1] if i > 0 else np.inf
            right = gaps[i]
            if min(left, right) > 2 * atol:
                assert got[i] == want[i], f"row {row}, rank {i}: {got} vs {want} (logprobs {lp})"


# ------------------------------------------------------------------------------------------ fp8 linear
@pytest.mark.parametrize("in_f, out_f, bias, x_shape", [
    (64, 32, True, (5, 64)),            # M not a multiple of 16
    (64, 48, False, (3, 7, 64)),        # 3-D input
    (128, 256, True, (1, 128)),         # one row
    (405, 100, True, (2, 17, 405)),     # in/out not multiples of 16 (0.2B's context projection is 9 x 45)
    (640, 1920, False, (513, 640)),     # 0.1B's FFN, a beam of 512 + 1
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_fp8_linear_on_cuda_matches_dequantized_reference(in_f, out_f, bias, x_shape, dtype, kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    q = QuantizedLinear(lin, "fp8").to(CUDA)
    q.activation_kernel = kernel
    x = torch.randn(*x_shape, device=CUDA).to(dtype)
    y = q(x)
    assert y.shape == (*x_shape[:-1], out_f) and y.dtype == dtype and torch.isfinite(y).all()
    w = q.dequantized_weight(torch.float32)
    b = None if lin.bias is None else lin.bias.to(CUDA)
    # against the weight-only emulation (the CPU path): only the activations' fp8 rounding differs
    assert rel_error(y, F.linear(x.float(), w, b)) < 0.05
    # against the same per-row fp8 activations in float32: only accumulation and the bf16 output differ
    flat = x.float().reshape(-1, in_f)
    x_scale = (flat.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    x_fp8 = (flat / x_scale).to(FP8).float() * x_scale
    exact = F.linear(x_fp8, w, b).reshape(y.shape)
    torch.testing.assert_close(y.float(), exact, rtol=2e-2, atol=2e-2 * float(exact.abs().max()))


def test_fp8_linear_cuda_matches_cpu_emulation_and_zero_rows():
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 80, bias=True)
    q_cpu = QuantizedLinear(lin, "fp8")
    q_gpu = copy.deepcopy(q_cpu).to(CUDA)
    x = torch.randn(33, 96)
    assert rel_error(q_gpu(x.to(CUDA)).cpu(), q_cpu(x)) < 0.05
    x[3] = 0.0                                   # an all-zero row: scale clamps, output is the bias
    torch.testing.assert_close(q_gpu(x.to(CUDA))[3].cpu(), lin.bias.detach(), rtol=0, atol=1e-2)
    empty = q_gpu(torch.zeros(0, 96, device=CUDA))
    assert empty.shape == (0, 80)


@pytest.mark.parametrize("m, k, k_pad, dtype, strided", [
    (5, 64, 64, torch.float32, False),
    (513, 640, 640, torch.bfloat16, False),     # 0.1B's width, a beam of 512 + 1
    (33, 405, 416, torch.bfloat16, False),      # inner dimension padded to 16
    (40, 1920, 1920, torch.bfloat16, True),     # rows with a stride (hidden[:, -1] feeds the heads)
    (7, 5952, 5952, torch.bfloat16, False),     # 1B's d_ff: wider than one block, two passes
    (0, 64, 64, torch.bfloat16, False),
])
def test_fused_row_quantization_matches_reference(m, k, k_pad, dtype, strided):
    torch.manual_seed(0)
    x = (torch.randn(m, 3 if strided else 1, k, device=CUDA) * 4).to(dtype)[:, -1]        # (m, k)
    if m > 3:
        x[3] = 0.0                                         # an all-zero row: the scale clamps, no NaN
        x[2, 0] = 1e4                                      # an outlier: its row's other values shrink
    x_q, x_scale = quantize_rows_fused(x, k_pad)
    ref_q, ref_scale = quantize_rows_reference(x, k_pad)
    assert x_q.dtype == FP8 and x_q.shape == (m, k_pad) and x_scale.shape == (m, 1) and x_scale.dtype == torch.float32
    torch.testing.assert_close(x_scale, ref_scale, rtol=1e-6, atol=0)
    got, want = x_q.float(), ref_q.float()
    assert torch.isfinite(got).all() and (got[:, k:] == 0).all()
    if m:
        # the same fp8 codes, but for the rare value on a rounding tie of a differently rounded division
        assert float((got == want).float().mean()) > 0.999
        torch.testing.assert_close(got, want, rtol=0.13, atol=2 ** -9)      # within one e4m3 step


def test_fp8_rule_on_cuda_small_calls_use_the_rounded_weight(catalogue):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = QuantizedLinear(lin, "fp8", min_rows=16).to(CUDA)
    small = torch.randn(15, 64, device=CUDA)
    torch.testing.assert_close(q(small), F.linear(small, q.dequantized_weight(torch.float32), lin.bias.to(CUDA)))
    big = torch.randn(16, 64, device=CUDA)             # >= min_rows: fp8 activations, a different rounding
    exact = F.linear(big, q.dequantized_weight(torch.float32), lin.bias.to(CUDA))
    assert 0 < rel_error(q(big), exact) < 0.05

    model = LazyDecoder(CFG).eval().to(CUDA)
    quantized = quantize_model(model, "fp8", rule=Fp8Rule(min_out_features=2 * CFG.d_model, min_rows=8))
    fp8 = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert fp8 and all(m.out_features >= 2 * CFG.d_model for m in fp8)
    assert len({id(m.memo) for m in fp8}) == 1                 # one memo: gate and up quantize x once
    ctx, targets = batch(CFG, catalogue)
    with torch.no_grad():
        assert rel_error(quantized(ctx.to(CUDA), targets.to(CUDA)), model(ctx.to(CUDA), targets.to(CUDA))) < 0.1


# ------------------------------------------------------------------------------------------ quantized model
@pytest.mark.parametrize("cfg", [CFG, UNALIGNED], ids=["aligned", "unaligned"])
def test_fp8_model_on_cuda_stays_close_and_serves(catalogue, cfg):
    torch.manual_seed(0)
    model = LazyDecoder(cfg).eval().to(CUDA)
    q = quantize_model(model, "fp8")
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in model.modules())
    ctx, targets = batch(cfg, catalogue)
    ctx, targets = ctx.to(CUDA), targets.to(CUDA)
    with torch.no_grad():
        ref, out = model(ctx, targets), q(ctx, targets)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = q(ctx, targets)
    assert rel_error(out, ref) < 0.1
    assert rel_error(out_bf16, ref) < 0.1
    tok = catalogue[2]
    recs = beam_search(q, ctx, tok.trie(), beam_width=16, top_k=5)
    assert recs.item_ids.is_cuda
    items = set(tok.item_ids.tolist())
    assert all(len(set(r)) == 5 and set(r) <= items for r in recs.item_ids.tolist())
    assert torch.isfinite(recs.logprobs).all() and (recs.logprobs <= 0).all()


# ------------------------------------------------------------------------------------------ decoder + beam
@pytest.mark.parametrize("cfg", [CFG, MOE], ids=["dense", "moe"])
def test_decoder_and_beam_search_on_cuda_match_cpu(catalogue, cfg):
    torch.manual_seed(0)
    cpu = peaked(LazyDecoder(cfg).eval())
    gpu = copy.deepcopy(cpu).to(CUDA)
    ctx, targets = batch(cfg, catalogue, b=5)
    with torch.no_grad():
        logits_cpu = cpu(ctx, targets)
        logits_gpu = gpu(ctx.to(CUDA), targets.to(CUDA))
        lp_gpu = gpu.item_logprob(ctx.to(CUDA), targets.to(CUDA))
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, rtol=1e-3, atol=1e-3)   # fp32 on both
    torch.testing.assert_close(lp_gpu.cpu(), cpu.item_logprob(ctx, targets), rtol=1e-3, atol=1e-3)

    trie = catalogue[2].trie()
    width = 128           # >= the valid prefixes at every level: both searches are exhaustive
    got = beam_search(gpu, ctx, trie, beam_width=width, top_k=6)    # bf16 autocast on CUDA
    assert got.item_ids.is_cuda and got.logprobs.dtype == torch.float32
    got_codes = got.semantic_ids.cpu()
    assert torch.equal(trie.to("cpu").items(got_codes), got.item_ids.cpu())   # ids and codes agree
    assert all(len(set(row)) == 6 for row in got.item_ids.tolist())
    # each logprob served is log pi(item) of the model it ran (bf16 autocast), what GBPO takes as pi_old
    rows = torch.arange(5).repeat_interleave(6)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        own = gpu.item_logprob(ctx.index_select(rows).to(CUDA), got_codes.reshape(-1, 3).to(CUDA)).view(5, 6)
    torch.testing.assert_close(got.logprobs, own.float(), rtol=0, atol=0.05)
    if cfg.n_experts:
        # top-k routing is discontinuous: bf16 rounding of the hidden state flips near-tied expert
        # choices of some tokens (seen: one item's log pi moved by 4 nats, on the CPU's bf16 autocast
        # as well), so the MoE search is compared with itself above, not with the float32 ranking
        return
    want = beam_search(cpu, ctx, trie, beam_width=width, top_k=6)
    assert_same_ranking(got.item_ids.tolist(), got.logprobs.tolist(), want.item_ids.tolist(),
                        want.logprobs.tolist())
    with torch.no_grad():
        exact = cpu.item_logprob(ctx.index_select(rows), got_codes.reshape(-1, 3)).view(5, 6)
    torch.testing.assert_close(got.logprobs.cpu(), exact, rtol=0, atol=BF16_ATOL)


# ------------------------------------------------------------------------------------------ decode attention
def decode_inputs(b, h, n_past, dh, dtype, seed=0):
    """q, k_new, v_new as the block makes them (strided views of one qkv projection) and a past cache
    that is a non-contiguous slice, like the beam's; values of a few units, as in a real model."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    qkv = (2 * torch.randn(b, 1, 3, h, dh, device=CUDA, generator=g)).to(dtype)
    q, k_new, v_new = qkv.permute(2, 0, 3, 1, 4)                              # (B, H, 1, dh) each
    past = (2 * torch.randn(2, b, h, n_past + 1, dh, device=CUDA, generator=g)).to(dtype)[:, :, :, 1:]
    return q, past[0], past[1], k_new, v_new


@pytest.fixture
def kernel_at_any_size(monkeypatch):
    """The decode kernel for small calls too (by default SDPA keeps calls of < DECODE_KERNEL_MIN_ROWS rows)."""
    monkeypatch.setattr(model_module, "DECODE_KERNEL_MIN_ROWS", 1)


def sdpa_self_attention(q, k, v, monkeypatch):
    """What causal_self_attention computed before the decode kernel: torch's SDPA."""
    with monkeypatch.context() as m:
        m.setattr(model_module, "DECODE_KERNEL_MAX_KEYS", 0)
        return causal_self_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b, h, n_past, dh", [(1, 1, 0, 64), (7, 4, 1, 64), (4096, 10, 2, 64), (33, 3, 3, 48),
                                              (5, 2, 7, 16)])
def test_decode_self_attention_matches_reference_and_sdpa(b, h, n_past, dh, dtype, kernel_at_any_size, monkeypatch):
    q, k_past, v_past, k_new, v_new = decode_inputs(b, h, n_past, dh, dtype)
    k, v = torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2)      # (B, H, n_past + 1, dh)
    with torch.no_grad():
        got = decode_self_attention(q, k_past, v_past, k_new, v_new)
        via_entry = causal_self_attention(q, k, v)                           # dispatches to the kernel
        want = causal_self_attention(q.float(), k.float(), v.float(), impl="reference")
        sdpa = sdpa_self_attention(q, k, v, monkeypatch)
    assert got.dtype == dtype and got.shape == (b, h, 1, dh) and torch.equal(via_entry, got)
    # float32 scores and sums, p rounded to the input dtype (as SDPA does): values |v| < ~8 here, so
    # a few units of that rounding in absolute terms
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (4e-2, 1.6e-2), torch.float16: (1e-2, 2e-3)}[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(got.float(), sdpa.float(), atol=tol[0], rtol=tol[1])


def test_decode_kernel_leaves_autograd_and_long_keys_to_sdpa(kernel_at_any_size):
    q, k_past, v_past, k_new, v_new = decode_inputs(6, 2, 2, 32, torch.float32)
    k, v = torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2)
    q = q.detach().clone().requires_grad_()
    out = causal_self_attention(q, k, v)                                     # the kernel has no backward
    out.sum().backward()
    assert out.grad_fn is not None and q.grad is not None and torch.isfinite(q.grad).all()
    long_k = torch.randn(6, 2, model_module.DECODE_KERNEL_MAX_KEYS + 1, 32, device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(causal_self_attention(q, long_k, long_k),
                                   causal_self_attention(q, long_k, long_k, impl="reference"), atol=1e-5, rtol=1e-5)


def test_decode_kernel_runs_for_large_calls_only(monkeypatch):
    """By default the kernel serves calls of >= DECODE_KERNEL_MIN_ROWS (beam x head) rows, SDPA the rest."""
    calls = []
    real = model_module.decode_self_attention
    monkeypatch.setattr(model_module, "decode_self_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    rows = model_module.DECODE_KERNEL_MIN_ROWS
    with torch.no_grad():
        for b in (rows // 4 - 1, rows // 4):
            q, k_past, v_past, k_new, v_new = decode_inputs(b, 4, 2, 64, torch.bfloat16)
            causal_self_attention(q, torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2))
    assert calls == [(rows // 4, 4, 1, 64)]


def test_incremental_decode_with_the_kernel_matches_sdpa_and_teacher_forcing(catalogue, kernel_at_any_size,
                                                                              monkeypatch):
    """A bf16 LazyDecoder fed [BOS, s1, s2] one token at a time: the kernel path (no concatenation at
    the last step, keep_cache=False) gives the hidden states of the SDPA path and of one T=3 pass."""
    torch.manual_seed(0)
    model = LazyDecoder(CFG).eval().to(CUDA)
    ctx, targets = batch(CFG, catalogue, b=5)
    ctx, rows = ctx.to(CUDA), model.teacher_rows(targets.to(CUDA))            # (5, 3)

    def incremental():
        hidden, past = [], None
        for t in range(3):
            h, past = model.decode(kv, rows[:, t:t + 1], past, keep_cache=t < 2)
            hidden.append(h)
        assert past is None                                                  # keep_cache=False at the end
        return torch.cat(hidden, 1)                                          # (5, 3, d)

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        kv = model.context_kv(ctx)
        full, _ = model.decode(kv, rows)
        fused = incremental()
        with monkeypatch.context() as m:
            m.setattr(model_module, "DECODE_KERNEL_MAX_KEYS", 0)
            sdpa = incremental()
    assert rel_error(fused, sdpa) < 1e-2 and rel_error(fused, full) < 1e-2


def test_beam_search_with_the_decode_kernel_serves_its_own_logprobs(catalogue, kernel_at_any_size):
    """test_decoder_and_beam_search_on_cuda_match_cpu's checks with the kernel in every decode step:
    the logprobs served are log pi(item) by teacher forcing (SDPA) under the same autocast, and the
    ranking is the float32 CPU search's."""
    torch.manual_seed(0)
    cpu = peaked(LazyDecoder(CFG).eval())
    gpu = copy.deepcopy(cpu).to(CUDA)
    ctx, _ = batch(CFG, catalogue, b=5)
    trie = catalogue[2].trie()
    got = beam_search(gpu, ctx, trie, beam_width=128, top_k=6)
    codes = got.semantic_ids.cpu()
    rows = torch.arange(5).repeat_interleave(6)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        own = gpu.item_logprob(ctx.index_select(rows).to(CUDA), codes.reshape(-1, 3).to(CUDA)).view(5, 6)
    torch.testing.assert_close(got.logprobs, own.float(), rtol=0, atol=0.05)
    want = beam_search(cpu, ctx, trie, beam_width=128, top_k=6)
    assert_same_ranking(got.item_ids.tolist(), got.logprobs.tolist(), want.item_ids.tolist(), want.logprobs.tolist())


# ------------------------------------------------------------------------------------------ learner
@pytest.mark.integration
def test_learner_trains_on_cuda(tmp_path, stream_config):
    """OnlineLearner with train.device=cuda on the real broker: a step commits, the loss is finite,
    the weights change, and the loss falls when the same batch is trained on again."""
    from streaming import schemas
    from streaming.topics import ensure_topics
    from tests.loop_helpers import loop_config, tokenizer
    from tests.test_learner import make_samples, produce, run_until

    from actors.learner import OnlineLearner

    ensure_topics(stream_config, kinds=("samples",))
    cfg = loop_config(tmp_path, micro_batch=16, max_batch_wait_s=0.5, consumer_group=f"gpu-{uuid.uuid4().hex[:6]}")
    cfg.stream = stream_config
    cfg.train.device = "cuda"
    tok = tokenizer(cfg.model.codebook_size)
    payloads = [schemas.encode_sample(s) for s in make_samples(16, tok, seed=3)]
    produce(stream_config, payloads)
    learner = OnlineLearner.from_config(cfg, tokenizer=tok)
    try:
        assert learner.device.type == "cuda"
        assert all(p.is_cuda and p.dtype == torch.float32 for p in learner.model.parameters())  # fp32 master weights
        before = {k: v.clone() for k, v in learner.model.state_dict().items()}
        run_until(learner, step=1)
        assert all(np.isfinite(v) for v in learner.last_losses.values())
        assert learner.counters()["nonfinite_steps"] == 0 and learner.counters()["failed_batches"] == 0
        changed = [k for k, v in learner.model.state_dict().items() if not torch.equal(before[k], v)]
        assert changed and all(torch.isfinite(v).all() for v in learner.model.state_dict().values())

        samples = [schemas.decode_sample(p) for p in payloads]      # what train_step decodes ...
        for sample in samples:                                       # ... and tokenizes (legacy traffic)
            if sample["semantic_id"] is None:
                sample["semantic_id"] = tok.codes_for([sample["item_id"]])[0].tolist()
        gen = [learner._optimize(samples)["gen"] for _ in range(8)]
        assert all(np.isfinite(gen)) and gen[-1] < gen[0], gen
        assert learner.checkpoint()                                  # CUDA tensors checkpoint (moved to host)
    finally:
        learner.close()


# ------------------------------------------------------------------------------------------ replica
def test_cuda_replica_serves_what_a_cpu_replica_serves(tmp_path):
    from actors.publisher import checksum_of, pack_weights
    from actors.replica import ServingReplica
    from simulator.users import UserSimulator
    from tests.loop_helpers import loop_config, tokenizer

    cfg = loop_config(tmp_path)
    tok = tokenizer(cfg.model.codebook_size)
    sim = UserSimulator.default(seed=0)
    contexts = [sim.context(int(u)) for u in sim.user_ids[:3]]

    def weights(seed):
        torch.manual_seed(seed)
        return peaked(LazyDecoder(cfg.model)).state_dict()

    torch.manual_seed(0)
    cpu = ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, version=0)
    torch.manual_seed(5)
    gpu = ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, version=0, device="cuda")
    assert gpu.health()["zero_copy"] is False
    with pytest.raises(ValueError, match="zero_copy"):
        ServingReplica(LazyDecoder(cfg.model), device="cuda", zero_copy=True)

    def same_answers():
        want = cpu.recommend(contexts, top_k=4, beam_width=256)
        got = gpu.recommend(contexts, top_k=4, beam_width=256)
        assert got["model_version"] == want["model_version"]
        assert_same_ranking(got["item_ids"], got["logprobs"], want["item_ids"], want["logprobs"])
        codes = tok.codes_for([i for row in got["item_ids"] for i in row]).tolist()
        assert codes == [c for row in got["semantic_ids"] for c in row]
        return got

    for version, seed in ((1, 1), (2, 2)):     # version 2 is copied into the idle model of version 0
        packed = pack_weights(weights(seed))
        assert cpu.apply_weights(version, packed, checksum_of(packed)) == version
        assert gpu.apply_weights(version, packed, checksum_of(packed)) == version
        served = same_answers()
    model = gpu._active.model
    assert all(t.is_cuda for t in model.state_dict().values())

    corrupted = pack_weights(weights(3))
    good_sum = checksum_of(corrupted)
    corrupted[-1] ^= 0xFF
    with pytest.raises(ValueError, match="checksum mismatch"):
        gpu.apply_weights(3, corrupted, good_sum)
    assert gpu.version == 2 and gpu._active.model is model                 # nothing was swapped
    assert gpu.recommend(contexts, top_k=4, beam_width=256) == served    # still version 2, deterministic
