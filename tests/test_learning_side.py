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


# ---- eq. 11's group normalization, tau_B window, gen_on_dislikes, lr, MoE bias ------------------
from learner.config import PRESET_LR  # noqa: E402
from learner.losses import rl_rows  # noqa: E402
from learner.step import StepBatch, StepWeights, train_step  # noqa: E402


@pytest.mark.parametrize("level", ["token", "item"])
def test_group_normalization_divides_by_every_row_of_the_batch(world, level):
    """`group`: RL = sum over rows with A != 0 / G with G = all rows (eq. 11); `active`: / their count."""
    item_ids, tok = world
    side = side_for(tok, algorithm="gbpo")
    batch = side._batch(samples_for(item_ids, tok))
    picked = token_logprobs(side.model, batch.ctx, batch.target)
    rows = batch.adv != 0
    assert 0 < int(rows.sum()) < len(rows)
    per_row = rl_rows("gbpo", picked[rows], batch.logp_old[rows], batch.adv[rows], level=level)
    got = {norm: rl_term(picked, batch, StepWeights(algorithm="gbpo", rl_level=level, rl_normalization=norm))[0]
           for norm in ("group", "active")}
    torch.testing.assert_close(got["group"], per_row.sum() / len(rows))
    torch.testing.assert_close(got["active"], per_row.sum() / int(rows.sum()))


def fed(q, dislike=False, source="legacy"):
    return {"feedback": {"dislike": dislike, "play_time_s": 1.0}, "q": q, "source": source}


def test_tau_window_spans_micro_batches_and_a_single_sample_can_be_positive(world):
    """tau_B is the top quartile of the last tau_window q, so a micro-batch of one can be positive."""
    _, tok = world
    side = side_for(tok, tau_window=8)
    assert side.advantages([fed(0.9)]).tolist() == [0.0]          # first q ever: its own tau_B
    side.advantages([fed(q) for q in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)])
    assert side.advantages([fed(0.95)]).tolist() == [1.0]         # above the window's top quartile
    assert side.advantages([fed(0.2)]).tolist() == [0.0]
    assert list(side.q_window) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.95, 0.2]   # rolling, maxlen 8
    assert side.advantages([fed(0.3, dislike=True)]).tolist() == [-1.0]


def test_tau_window_ties_are_not_positive(world):
    _, tok = world
    side = side_for(tok, tau_window=16)
    side.advantages([fed(1.0) for _ in range(6)] + [fed(0.5) for _ in range(6)])   # tau_B = 1
    assert side.advantages([fed(1.0), fed(0.99)]).tolist() == [0.0, 0.0]


def test_tau_window_survives_a_checkpoint(world):
    _, tok = world
    side = side_for(tok)
    side.advantages([fed(q) for q in (0.1, 0.7, 0.3)])
    files, manifest = side.state_files()
    other = side_for(tok)
    other.load_state(files, manifest)
    assert list(other.q_window) == [0.1, 0.7, 0.3]


@pytest.mark.parametrize("gen_on_dislikes", [False, True])
def test_gen_on_dislikes_false_leaves_disliked_exposures_out_of_l_gen(world, gen_on_dislikes):
    item_ids, tok = world
    samples = samples_for(item_ids, tok)
    side = side_for(tok, algorithm="sft", gen_on_dislikes=gen_on_dislikes)
    batch = side._batch(samples)
    disliked = torch.tensor([s["feedback"]["dislike"] for s in samples])
    assert disliked.any()
    with torch.no_grad():
        picked = token_logprobs(side.model, batch.ctx, batch.target)
    result = train_step(side.model, torch.optim.SGD(side.model.parameters(), lr=0.0), batch, weights=side.weights)
    kept = ~disliked if not gen_on_dislikes else torch.ones_like(disliked)
    assert result.gen == pytest.approx(float(-picked[kept].mean()), rel=1e-5)


def test_lr_follows_table5_per_preset_with_linear_warmup():
    assert TrainConfig().base_lr("tiny") == 1e-3
    assert TrainConfig().base_lr("0.5B") == 2.24e-4 and TrainConfig().base_lr("8B") == 5.59e-5
    assert PRESET_LR["4B-A0.5B"] == PRESET_LR["0.5B"]
    assert TrainConfig(lr=3e-4).base_lr("8B") == 3e-4                       # explicit lr wins
    cfg = TrainConfig(warmup_steps=4)
    assert [cfg.lr_at(s, "1B") for s in range(6)] == pytest.approx([1.58e-4 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])
    assert TrainConfig(warmup_steps=0).lr_at(0, "2B") == 1.12e-4
    with pytest.raises(ValueError, match="preset"):
        TrainConfig().base_lr("3B")


def test_learner_steps_at_the_warmup_rate(world):
    item_ids, tok = world
    side = side_for(tok, warmup_steps=4, lr=1e-2)
    rates = []
    for seed in range(3):
        side.update(samples_for(item_ids, tok, seed=seed))
        rates.append(side.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([2.5e-3, 5e-3, 7.5e-3])


def test_moe_balancing_bias_moves_once_per_optimizer_step(world):
    """Each forward in training mode moves the bias by rate * sign(mean load - load): one step, one move."""
    item_ids, tok = world
    cfg = CFG.replace(n_experts=4, moe_top_k=2, moe_d_ff=16, first_dense_layers=1, moe_bias_update_rate=0.01)
    torch.manual_seed(0)
    side = PolicyLearner(cfg, TrainConfig(weight_decay=0.0), tok)
    biases = [m.expert_bias for m in side.model.modules() if hasattr(m, "expert_bias")]
    assert biases
    before = [b.clone() for b in biases]
    assert side.update(samples_for(item_ids, tok)) is not None
    moves = torch.cat([(b - b0).abs() for b, b0 in zip(biases, before)])
    assert moves.max() > 0
    torch.testing.assert_close(moves, torch.where(moves > 0, torch.full_like(moves, 0.01), moves))
