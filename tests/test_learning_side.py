"""The learning side in-process (no broker, no Ray): the objective switch and the RL term it adds."""
import numpy as np
import pytest
import torch

from actors.learning import PolicyLearner
from learner.config import ModelConfig, TrainConfig
from learner.step import rl_term, token_logprobs
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=4, max_long=4, item_hash_buckets=256,
                                           n_layers=2, n_experts=0, first_dense_layers=2)


@pytest.fixture(scope="module")
def world():
    item_ids, _, tok = random_catalogue(60, codebook_size=8, seed=3)
    return item_ids, tok


def samples_for(item_ids, tok, n=24, seed=0):
    """Samples as the join emits them: half from our policy (logged log pi_old), half legacy."""
    rng = np.random.default_rng(seed)
    items = rng.choice(item_ids, n)
    codes = tok.codes_for(items)
    out = []
    for i in range(n):
        onerec = i % 2 == 0
        out.append({"request_id": f"r{i}", "user_id": i % 5, "item_id": int(items[i]), "ts": 1.0 + i,
                    "model_version": 1, "source": "onerec" if onerec else "legacy",
                    "context": random_context(rng, CFG, item_ids), "semantic_id": codes[i].tolist(),
                    "duration_s": 20.0, "logprob": float(-rng.uniform(3, 8)) if onerec else None,
                    "feedback": {"play_time_s": float(rng.uniform(0, 20)), "dislike": bool(i % 6 == 5)},
                    "q": float(rng.uniform()), "duration_bucket": 4})
    return out


def side_for(tok, **train):
    torch.manual_seed(0)
    return PolicyLearner(CFG, TrainConfig(weight_decay=0.0, **train), tok)


@pytest.mark.parametrize("algorithm", ["gbpo", "ecpo"])
def test_rl_term_gradient_is_the_closed_form(world, algorithm):
    """d RL / d log pi on the rows with A != 0, fed with the logged log-probabilities and advantages."""
    item_ids, tok = world
    side = side_for(tok, algorithm=algorithm, rl_level="item", rl_normalization="active")
    batch = side._batch(samples_for(item_ids, tok))
    picked = token_logprobs(side.model, batch.ctx, batch.target)       # (B, 3)
    picked.retain_grad()
    logp = picked.sum(-1)                                             # log pi; item level: each token gets d/d log pi
    rl, rows = rl_term(picked, batch, side.weights)
    assert len(rows) > 0 and set(rows.tolist()) == set(torch.nonzero(batch.adv).flatten().tolist())
    rl.backward()
    torch.testing.assert_close(picked.grad, picked.grad[:, :1].expand_as(picked.grad))
    grad = picked.grad[:, 0]
    lp, adv = logp.detach()[rows], batch.adv[rows]
    old = torch.where(torch.isnan(batch.logp_old[rows]), lp, batch.logp_old[rows])
    if algorithm == "gbpo":   # eq. 12: pi'_old = max(pi_old, sg(pi)) for A >= 0, max(pi_old, 1 - sg(pi)) for A < 0
        bound = torch.where(adv >= 0, lp, torch.log1p(-torch.exp(lp)))
        ratio = torch.exp(lp - torch.maximum(old, bound))
        expect = -adv * ratio / len(rows)                       # d(-A r)/d log pi = -A r
    else:                     # eqs. 13-14; inside the clip range the gradient is -A r
        ratio = torch.exp(lp - torch.maximum(lp - np.log1p(0.3), old))
        inside = ((ratio >= 0.8) & (ratio <= 1.2)) | ((adv > 0) & (ratio < 0.8)) | ((adv < 0) & (ratio > 1.2))
        expect = torch.where(inside, -adv * ratio, torch.zeros_like(ratio)) / len(rows)
    torch.testing.assert_close(grad[rows], expect, rtol=1e-4, atol=1e-7)
    others = torch.ones(len(logp), dtype=torch.bool)
    others[rows] = False
    assert torch.all(grad[others] == 0)


@pytest.mark.parametrize("algorithm", ["gbpo", "ecpo", "sft"])
def test_objective_switch_moves_weights_only_through_its_rl_term(world, algorithm):
    """With L_Gen weighted 0, only the RL term can move the weights: gbpo/ecpo do, sft does not."""
    item_ids, tok = world
    side = side_for(tok, algorithm=algorithm, sft_weight=0.0)
    before = {k: v.clone() for k, v in side.model.state_dict().items()}
    result = side.update(samples_for(item_ids, tok))
    assert result is not None and np.isfinite(result["loss"])
    moved = any(not torch.equal(before[k], v) for k, v in side.model.state_dict().items())
    assert moved == (algorithm != "sft")
    assert (result["rl"] == 0.0) == (algorithm == "sft")


def test_rl_on_legacy_keeps_advantages_only_on_legacy_samples(world):
    """Table 6's "w/o OneRec samples": the RL term sees only the legacy traffic's exposures."""
    item_ids, tok = world
    samples = samples_for(item_ids, tok)
    everything = side_for(tok).advantages(samples)
    legacy_only = side_for(tok, rl_on="legacy").advantages(samples)
    is_legacy = torch.tensor([s["source"] == "legacy" for s in samples])
    assert torch.equal(legacy_only[is_legacy], everything[is_legacy]) and (everything[~is_legacy] != 0).any()
    assert torch.all(legacy_only[~is_legacy] == 0)


def test_bad_samples_are_counted_and_skipped(world):
    item_ids, tok = world
    samples = samples_for(item_ids, tok, n=6)
    samples[0] = {**samples[1], "request_id": "bad", "semantic_id": [99, 0, 0]}    # outside the codebook
    samples[2] = {**samples[3], "request_id": "bad2", "context": {"profile": "x"}}  # the featurizer refuses it
    side = side_for(tok)
    result = side.update(samples)
    assert result is not None and result["samples"] == 4 and side.stats["bad"] == 2
