"""FLOPs: analytic counts equal FlopCounterMode on small configs; Appendix B reproduces Table 1;
the baselines have the lazy decoder's parameter count and the same training API."""
import numpy as np
import pytest
import torch

from learner.baselines import EncoderDecoder, NaiveDecoderOnly, equal_param_layers
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.flops import (appendix_b_gflops, counted_flops, encoder_decoder_forward_flops, generation_flops,
                           lazy_forward_flops, naive_forward_flops)
from learner.model import LazyDecoder
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=5, max_long=9, item_hash_buckets=256,
                                           profile_fields=3, n_layers=4)


@pytest.fixture(scope="module")
def batch():
    item_ids, _, tok = random_catalogue(60, codebook_size=8, seed=6)
    rng = np.random.default_rng(0)
    ctx = build_context_batch([random_context(rng, CFG, item_ids, n_short=5, n_long=9)], tok, CFG)
    return ctx, torch.from_numpy(tok.codes_for(item_ids[:1]))


def train_count(model, ctx, targets):
    model.attn_impl = "reference"
    return counted_flops(lambda: model.loss(ctx, targets).backward())


@pytest.mark.parametrize("variant", [{}, {"g_kv": 2, "l_kv": 2, "s_kv": 2},
                                     {"n_experts": 4, "moe_top_k": 2, "moe_d_ff": 16, "first_dense_layers": 2}])
def test_lazy_analytic_flops_equal_counted(batch, variant):
    ctx, targets = batch
    cfg = CFG.replace(**variant)
    model = LazyDecoder(cfg)
    n = ctx.n_tokens
    assert counted_flops(lambda: model.attn_impl == "reference" or None) == 0
    model.attn_impl = "reference"
    assert counted_flops(lambda: model(ctx, targets)) == lazy_forward_flops(cfg, n)["total"]
    assert train_count(model, ctx, targets) == 3 * lazy_forward_flops(cfg, n)["total"]


def test_baseline_analytic_flops_equal_counted(batch):
    ctx, targets = batch
    n = ctx.n_tokens
    layers = equal_param_layers(CFG)
    encdec = EncoderDecoder(CFG)
    naive = NaiveDecoderOnly(CFG)
    expect_ed = encoder_decoder_forward_flops(CFG, n, n_encoder=layers["encoder"], n_decoder=layers["decoder"])
    assert train_count(encdec, ctx, targets) == 3 * expect_ed["total"]
    assert train_count(naive, ctx, targets) == 3 * naive_forward_flops(CFG, n, n_layers=layers["naive"])["total"]


def test_baselines_have_equal_parameters_and_the_same_api(batch):
    ctx, targets = batch
    cfg = CFG.replace(n_layers=8)          # 8 lazy blocks = 4 + 4 encoder-decoder blocks = 9 naive blocks
    lazy = LazyDecoder(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert equal_param_layers(cfg) == {"encoder": 4, "decoder": 4, "naive": 9}
    for model in (EncoderDecoder(cfg), NaiveDecoderOnly(cfg)):
        assert abs(count(model) / count(lazy) - 1) < 0.05
        logits = model(ctx, targets)
        assert logits.shape == (1, 3, cfg.codebook_size)
        assert model.loss(ctx, targets).dim() == 0 and model.item_logprob(ctx, targets).shape == (1,)
        model.attn_impl = "reference"
        torch.testing.assert_close(model(ctx, targets), logits, atol=1e-5, rtol=1e-4)


def test_naive_decoder_is_causal_over_the_targets(batch):
    ctx, targets = batch
    model = NaiveDecoderOnly(CFG)
    other = targets.clone()
    other[:, 1] = (other[:, 1] + 1) % CFG.codebook_size
    torch.testing.assert_close(model(ctx, targets)[:, :2], model(ctx, other)[:, :2])


def test_appendix_b_reproduces_table1():
    # Table 1, 1B parameters: encoder-decoder 346 / 1988 GFLOPs, naive decoder-only 632 / 3618, lazy 18
    assert appendix_b_gflops("encoder_decoder", params=1e9, n_context=512) == pytest.approx(346, rel=0.01)
    assert appendix_b_gflops("encoder_decoder", params=1e9, n_context=3000) == pytest.approx(1988, rel=0.01)
    assert appendix_b_gflops("naive", params=1e9, n_context=512) == pytest.approx(632, rel=0.01)
    assert appendix_b_gflops("naive", params=1e9, n_context=3000) == pytest.approx(3618, rel=0.01)
    assert appendix_b_gflops("lazy", params=1e9, n_context=512) == pytest.approx(18, rel=0.01)


def test_lazy_flops_at_1b_are_close_to_table2():
    cfg = ModelConfig.from_name("1B")
    forward = lazy_forward_flops(cfg, 512)
    # Table 2: Lazy Dec-Only 1B, 18.89 GFLOPs, with the context shared by k = 5 impressions (Appendix B)
    gflops = 3 * (forward["total"] - forward["context"] + forward["context"] / 5) / 1e9
    assert gflops == pytest.approx(18.89, rel=0.05)


def test_generation_flops_count_the_cached_beam_search(batch):
    from learner.beam import beam_search

    ctx, _ = batch
    item_ids, _, tok = random_catalogue(60, codebook_size=8, seed=6)
    model = LazyDecoder(CFG).eval()
    model.attn_impl = "reference"
    counted = counted_flops(lambda: beam_search(model, ctx, tok.trie(), beam_width=4, top_k=2))
    w1 = min(4, len(np.unique(tok.codes[:, 0])))
    analytic = generation_flops(CFG, ctx.n_tokens, beams_per_level=(1, w1, 4))
    assert counted == analytic
