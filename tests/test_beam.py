"""Constrained beam search: valid distinct items, exhaustive top-1, logprobs equal to item_logprob."""
import numpy as np
import pytest
import torch

from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=5, max_long=8, item_hash_buckets=512)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    item_ids, _, tok = random_catalogue(60, codebook_size=8, seed=3)
    model = LazyDecoder(CFG).eval()
    with torch.no_grad():   # sharpen the heads so that the ranking is not a near-tie everywhere
        for head in model.heads:
            head.weight.mul_(20.0)
    rng = np.random.default_rng(0)
    ctx = build_context_batch([random_context(rng, CFG, item_ids) for _ in range(3)], tok, CFG)
    return model, tok, ctx


def all_item_logprobs(model, tok, ctx):
    """(B, N_items) log pi(item | user) for every catalogue item, by brute force."""
    codes = torch.from_numpy(tok.codes)
    out = []
    for row in range(len(ctx)):
        rep = ctx.index_select([row] * len(codes))
        out.append(model.item_logprob(rep, codes))
    return torch.stack(out)


def test_top1_equals_exhaustive_argmax_and_logprobs_match(setup):
    model, tok, ctx = setup
    with torch.no_grad():
        recs = beam_search(model, ctx, tok.trie(), beam_width=512, top_k=10)
        brute = all_item_logprobs(model, tok, ctx)
    best = torch.from_numpy(tok.item_ids)[brute.argmax(1)]
    assert (recs.item_ids[:, 0] == best).all()
    # exhaustive width: the top 10 are the brute-force top 10, in order, with the same logprobs
    top = torch.topk(brute, 10, dim=1)
    assert (recs.item_ids == torch.from_numpy(tok.item_ids)[top.indices]).all()
    torch.testing.assert_close(recs.logprobs, top.values, atol=1e-4, rtol=1e-4)


def test_only_valid_distinct_items_with_their_semantic_ids(setup):
    model, tok, ctx = setup
    recs = beam_search(model, ctx, tok.trie(), beam_width=4, top_k=4)
    assert recs.item_ids.shape == (3, 4) and recs.semantic_ids.shape == (3, 4, 3) and recs.logprobs.shape == (3, 4)
    valid = set(tok.item_ids.tolist())
    for row in range(3):
        items = recs.item_ids[row].tolist()
        assert len(set(items)) == 4 and set(items) <= valid
        np.testing.assert_array_equal(tok.codes_for(items), recs.semantic_ids[row].numpy())
        assert (recs.logprobs[row, :-1] >= recs.logprobs[row, 1:]).all()   # sorted best first
        with torch.no_grad():
            lp = model.item_logprob(ctx.index_select([row] * 4), recs.semantic_ids[row])
        torch.testing.assert_close(recs.logprobs[row], lp, atol=1e-4, rtol=1e-4)


def test_beam_width_larger_than_catalogue_and_batch_rows_are_independent(setup):
    model, tok, ctx = setup
    together = beam_search(model, ctx, tok.trie(), beam_width=1024, top_k=60)
    assert all(len(set(r)) == 60 for r in together.item_ids.tolist())     # the whole catalogue, once
    alone = beam_search(model, ctx.index_select([1]), tok.trie(), beam_width=1024, top_k=60)
    assert (alone.item_ids[0] == together.item_ids[1]).all()


def test_sparse_catalogue_prefixes(setup):
    """A catalogue whose items share few prefixes still yields top_k distinct items."""
    model, tok, ctx = setup
    from learner.tokenizer import SemanticTokenizer

    small = SemanticTokenizer()
    rng = np.random.default_rng(0)
    small.fit(np.arange(12), rng.normal(size=(12, 4)).astype(np.float32), codebook_sizes=(8, 8, 8))
    recs = beam_search(model, ctx, small.trie(), beam_width=3, top_k=3)
    assert all(len(set(r)) == 3 and set(r) <= set(range(12)) for r in recs.item_ids.tolist())


def test_bad_arguments_raise(setup):
    model, tok, ctx = setup
    with pytest.raises(ValueError, match="top_k"):
        beam_search(model, ctx, tok.trie(), beam_width=2, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        beam_search(model, ctx, tok.trie(), beam_width=100, top_k=61)


def test_moe_model_top1_is_exhaustive_argmax(setup):
    _, tok, ctx = setup
    torch.manual_seed(1)
    cfg = CFG.replace(n_layers=3, n_experts=4, moe_top_k=2, moe_d_ff=16, first_dense_layers=1)
    model = LazyDecoder(cfg).eval()
    with torch.no_grad():
        recs = beam_search(model, ctx, tok.trie(), beam_width=512, top_k=1)
        brute = all_item_logprobs(model, tok, ctx)
    assert (recs.item_ids[:, 0] == torch.from_numpy(tok.item_ids)[brute.argmax(1)]).all()


def test_profile_only_context_is_served(setup):
    """A brand-new user has profile fields and no behaviour yet: the model still recommends."""
    model, tok, _ = setup
    empty = {"item_id": [], "duration_s": [], "play_time_s": [], "flags": []}
    ctx = build_context_batch([{"profile": [1] * CFG.profile_fields, "short": empty, "long": empty}], tok, CFG)
    assert ctx.mask.shape[1] == 0 or not ctx.mask.any()
    recs = beam_search(model, ctx, tok.trie(), beam_width=16, top_k=5)
    assert recs.item_ids.shape == (1, 5) and torch.isfinite(recs.logprobs).all()
    assert torch.allclose(recs.logprobs[0], model.item_logprob(ctx.index_select([0] * 5), recs.semantic_ids[0]), atol=1e-4)


def test_sampling_from_beam_follows_pi_and_greedy_at_zero():
    from learner.beam import Recommendations, sample_from_beam

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    recs = Recommendations(item_ids=torch.tensor([[10, 11, 12, 13]]),
                           semantic_ids=torch.arange(12).view(1, 4, 3), logprobs=p.log())
    greedy = sample_from_beam(recs, top_k=2, temperature=0.0)
    assert greedy.item_ids.tolist() == [[10, 11]] and greedy.semantic_ids.tolist() == [[[0, 1, 2], [3, 4, 5]]]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from_beam(recs.__class__(recs.item_ids.expand(500, 4), recs.semantic_ids.expand(500, 4, 3),
                                                         recs.logprobs.expand(500, 4)), top_k=1, temperature=1.0,
                                          generator=gen).item_ids[:, 0] for _ in range(20)]).flatten()
    freq = torch.stack([(draws == i).float().mean() for i in (10, 11, 12, 13)])
    assert torch.allclose(freq, p[0], atol=0.02)                  # sampling, not argmax
    two = sample_from_beam(recs, top_k=4, temperature=1.0, generator=gen)
    assert sorted(two.item_ids[0].tolist()) == [10, 11, 12, 13]  # without replacement
    picked = two.item_ids[0].tolist()
    assert torch.allclose(two.logprobs[0], p[0, [i - 10 for i in picked]].log())  # pi_old stays log pi(item)
    with pytest.raises(ValueError, match="temperature"):
        sample_from_beam(recs, top_k=1, temperature=-1.0)
