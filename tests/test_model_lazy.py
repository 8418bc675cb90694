"""Lazy decoder: shapes, causality, kv variants, GQA vs MHA, no K/V projections, reference vs fast paths."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.ops import causal_self_attention, cross_attention
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=6, max_long=10, item_hash_buckets=512)


@pytest.fixture(scope="module")
def catalogue():
    return random_catalogue(200, codebook_size=8, seed=2)


def make_batch(cfg, catalogue, b=3, seed=0):
    item_ids, _, tok = catalogue
    rng = np.random.default_rng(seed)
    ctx = build_context_batch([random_context(rng, cfg, item_ids) for _ in range(b)], tok, cfg)
    targets = torch.from_numpy(tok.codes_for(rng.choice(item_ids, b)))
    return ctx, targets


def test_output_shapes_and_loss(catalogue):
    torch.manual_seed(0)
    model = LazyDecoder(CFG)
    ctx, targets = make_batch(CFG, catalogue)
    logits = model(ctx, targets)
    assert logits.shape == (3, 3, CFG.codebook_size)
    loss = model.loss(ctx, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expect = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).mean()  # eq. (10)
    torch.testing.assert_close(loss, expect)
    lp = model.item_logprob(ctx, targets)
    assert lp.shape == (3,) and (lp < 0).all()
    torch.testing.assert_close(lp, -3 * F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1))


def test_causality_changing_s2_leaves_s1_and_s2_logits(catalogue):
    torch.manual_seed(0)
    model = LazyDecoder(CFG)
    ctx, targets = make_batch(CFG, catalogue)
    other = targets.clone()
    other[:, 1] = (other[:, 1] + 1) % CFG.codebook_size       # s2 changes: input at position 2 only
    a, b = model(ctx, targets), model(ctx, other)
    torch.testing.assert_close(a[:, :2], b[:, :2])              # logits of s1 and s2 unchanged
    assert not torch.allclose(a[:, 2], b[:, 2])
    other = targets.clone()
    other[:, 2] = (other[:, 2] + 1) % CFG.codebook_size       # s3 is never an input
    torch.testing.assert_close(model(ctx, other), a)


@pytest.mark.parametrize("s_kv,l_kv,g_kv", [(1, 1, 4), (2, 1, 4), (1, 2, 2), (2, 2, 1), (1, 2, 4)])
def test_kv_variants(catalogue, s_kv, l_kv, g_kv):
    torch.manual_seed(0)
    cfg = CFG.replace(s_kv=s_kv, l_kv=l_kv, g_kv=g_kv, n_layers=2)
    model = LazyDecoder(cfg)
    ctx, targets = make_batch(cfg, catalogue)
    kv = model.context_kv(ctx)
    assert len(kv) == l_kv
    n = ctx.n_tokens
    for k, v in kv:
        assert k.shape == v.shape == (3, g_kv, n, cfg.d_head)
        assert (v is k) == (s_kv == 1)                          # eq. (4)
    assert model.context.embed.item_proj.out_features == s_kv * l_kv * g_kv * cfg.d_head  # eq. (1)
    assert [cfg.kv_layer(layer) for layer in range(2)] == [0, l_kv // 2]     # eq. (9)
    logits = model(ctx, targets)
    assert logits.shape == (3, 3, cfg.codebook_size)
    model.loss(ctx, targets).backward()
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params(include_sparse=True)


def test_kv_sharing_follows_eq9():
    cfg = ModelConfig.from_name("tiny").replace(n_layers=18, l_kv=3)
    assert [cfg.kv_layer(layer) for layer in range(18)] == [0] * 6 + [1] * 6 + [2] * 6


def test_lazy_cross_attention_has_no_kv_projection(catalogue):
    model = LazyDecoder(CFG)
    block = model.blocks[0]
    names = [n for n, _ in block.named_parameters() if n.startswith("cross")]
    assert names == ["cross_q.weight", "cross_o.weight"]
    # the whole decoder's parameter count is the analytic one, which has 2 d^2 per cross-attention
    assert sum(p.numel() for p in model.parameters()) == CFG.n_params(include_sparse=True)


def test_gqa_with_g_equal_heads_matches_plain_multihead_attention():
    torch.manual_seed(0)
    b, t, h, dh, n = 2, 3, 4, 8, 11
    d = h * dh
    x = torch.randn(b, t, d)
    ctx = torch.randn(b, n, d)
    mask = torch.rand(b, n) > 0.3
    mask[:, 0] = True
    wq, wo = torch.randn(d, d) / d ** 0.5, torch.randn(d, d) / d ** 0.5
    q = (x @ wq.T).view(b, t, h, dh)
    k = ctx.view(b, n, h, dh).transpose(1, 2)                      # no projection: the context is k = v
    ours = cross_attention(q, k, k, mask).reshape(b, t, d) @ wo.T
    mha = torch.nn.MultiheadAttention(d, h, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([wq, torch.eye(d), torch.eye(d)]))
        mha.out_proj.weight.copy_(wo)
    ref, _ = mha(x, ctx, ctx, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), w=st.integers(1, 4), t=st.integers(1, 3), g=st.sampled_from([1, 2, 4]),
       r=st.sampled_from([1, 2]), n=st.integers(1, 9), masked=st.booleans(), seed=st.integers(0, 1000))
def test_cross_attention_fast_path_matches_reference(b, w, t, g, r, n, masked, seed):
    torch.manual_seed(seed)
    dh = 8
    q = torch.randn(b * w, t, g * r, dh, requires_grad=True)
    k = torch.randn(b, g, n, dh, requires_grad=True)
    v = torch.randn(b, g, n, dh, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(b, n) > 0.4
        mask[:, -1] = True
    outs, grads = [], []
    for impl in ("reference", "sdpa"):
        out = cross_attention(q, k, v, mask, impl=impl)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for a, b_ in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-3)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), tk=st.integers(1, 3), seed=st.integers(0, 1000), data=st.data())
def test_self_attention_fast_path_matches_reference(b, tk, seed, data):
    tq = data.draw(st.integers(1, tk))
    torch.manual_seed(seed)
    q = torch.randn(b, 2, tq, 8, requires_grad=True)
    k = torch.randn(b, 2, tk, 8, requires_grad=True)
    v = torch.randn(b, 2, tk, 8, requires_grad=True)
    ref = causal_self_attention(q, k, v, impl="reference")
    fast = causal_self_attention(q, k, v, impl="sdpa")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    g1 = torch.autograd.grad(ref.sum(), (q, k, v))
    g2 = torch.autograd.grad(fast.sum(), (q, k, v))
    for a, b_ in zip(g2, g1):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-3)


def test_model_reference_and_fast_paths_agree(catalogue):
    torch.manual_seed(0)
    cfg = CFG.replace(g_kv=2)
    model = LazyDecoder(cfg)
    ctx, targets = make_batch(cfg, catalogue, b=4)
    fast = model(ctx, targets)
    model.attn_impl = "reference"
    torch.testing.assert_close(model(ctx, targets), fast, atol=1e-5, rtol=1e-4)


def test_incremental_cache_equals_full_recompute(catalogue):
    torch.manual_seed(0)
    model = LazyDecoder(CFG)
    ctx, targets = make_batch(CFG, catalogue)
    full = model(ctx, targets)
    kv = model.context_kv(ctx)
    rows = torch.cat([torch.zeros(3, 1, dtype=torch.long), model.input_tokens(targets[:, :2], start=1)], 1)
    past, steps = None, []
    for i in range(3):
        h, past = model.decode(kv, rows[:, i:i + 1], past)
        steps.append(model.level_logits(h[:, -1], i))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_context_kv_is_shared_by_beams(catalogue):
    """Queries of W beams per context read the same (k, v): equal to repeating the context W times."""
    torch.manual_seed(0)
    model = LazyDecoder(CFG)
    ctx, targets = make_batch(CFG, catalogue, b=2)
    kv = model.context_kv(ctx)
    rows = torch.zeros(2 * 3, 1, dtype=torch.long)
    shared, _ = model.decode(kv, rows)
    repeated, _ = model.decode(model.context_kv(ctx.index_select([0, 0, 0, 1, 1, 1])), rows)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-4)


def test_loss_falls_on_a_learnable_task(catalogue):
    """Target = the newest short-term item: copying it from the context must be learned."""
    from learner.synthetic import learnable_task

    torch.manual_seed(0)
    item_ids, _, tok = catalogue
    cfg = CFG
    model = LazyDecoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = np.random.default_rng(0)
    contexts, target_items = learnable_task(rng, cfg, item_ids, 256)
    ctx = build_context_batch(contexts, tok, cfg)
    targets = torch.from_numpy(tok.codes_for(target_items))
    first = model.loss(ctx, targets).item()
    for step in range(80):
        rows = torch.from_numpy(rng.choice(256, 64))
        loss = model.loss(ctx.index_select(rows), targets[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model.loss(ctx, targets).item()
    assert last < 0.5 * first, (first, last)


def test_bad_input_raises_value_error_naming_the_field(catalogue):
    model = LazyDecoder(CFG)
    ctx, targets = make_batch(CFG, catalogue)
    with pytest.raises(ValueError, match="target_sids"):
        model(ctx, targets[:2])
    with pytest.raises(ValueError, match="target_sids"):
        model(ctx, targets + CFG.codebook_size)
    with pytest.raises(ValueError, match="target_sids"):
        model(ctx, targets.float())
    bad = ctx.index_select([0, 1, 2])
    bad.flags[0, 0] = 500
    with pytest.raises(ValueError, match="flags"):
        model(bad, targets)
    bad = ctx.index_select([0, 1, 2])
    bad.profile = bad.profile[:, :3]
    with pytest.raises(ValueError, match="profile"):
        model(bad, targets)
    bad = ctx.index_select([0, 1, 2])
    bad.semantic_ids = bad.semantic_ids[:, :-1]
    with pytest.raises(ValueError, match="semantic_ids"):
        model(bad, targets)


def test_moe_model_trains_and_counts(catalogue):
    torch.manual_seed(0)
    cfg = CFG.replace(n_layers=3, n_experts=4, moe_top_k=2, moe_d_ff=32, first_dense_layers=1)
    model = LazyDecoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params(include_sparse=True)
    ctx, targets = make_batch(cfg, catalogue)
    model.loss(ctx, targets).backward()
    assert model.blocks[2].ffn.w_gate.grad is not None
