"""learner.step.train_step: one forward per step, L_Gen and log pi from it, and the RL term's gradient.

The RL tests read the gradient that reaches the per-token log-probabilities with L_Gen weighted 0,
so all of it comes from the RL term; at item level each of a row's 3 tokens receives d RL / d log pi
(log pi is their sum), and dropping the term from the loss leaves none.
"""
import math

import numpy as np
import pytest
import torch

from learner import step as step_module
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.losses import ecpo_loss
from learner.model import LazyDecoder
from learner.step import StepBatch, StepWeights, gen_and_logprob, train_step
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=6, max_long=10, item_hash_buckets=512)
B = 8


@pytest.fixture(scope="module")
def catalogue():
    return random_catalogue(200, codebook_size=8, seed=3)


def make_batch(catalogue, *, adv=None, logp_old=None, seed=0) -> StepBatch:
    item_ids, _, tok = catalogue
    rng = np.random.default_rng(seed)
    ctx = build_context_batch([random_context(rng, CFG, item_ids) for _ in range(B)], tok, CFG)
    target = torch.from_numpy(tok.codes_for(rng.choice(item_ids, B)))
    return StepBatch(ctx, target, logp_old=logp_old, adv=adv)


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = LazyDecoder(CFG)
    return model, torch.optim.SGD(model.parameters(), lr=0.0)    # lr 0: the weights stay, gradients remain


def record_logp_grad(monkeypatch) -> dict:
    """Wrap the step's forward to keep log pi (sum of the tokens') and the gradient on each token."""
    seen = {}
    real = step_module.token_logprobs

    def recording(model, ctx, target):
        picked = real(model, ctx, target)                              # (B, 3)
        seen["logp"] = picked.detach().sum(-1).clone()
        picked.register_hook(lambda g: seen.__setitem__("tokens_grad", g.detach().clone()))
        return picked

    monkeypatch.setattr(step_module, "token_logprobs", recording)
    return seen


def item_grad(seen) -> torch.Tensor:
    """d RL / d log pi at item level: the same on each of a row's 3 tokens (checked), returned (B,)."""
    grad = seen["tokens_grad"]
    torch.testing.assert_close(grad, grad[:, :1].expand_as(grad))
    return grad[:, 0]


@pytest.mark.parametrize("algorithm", ["sft", "gbpo", "ecpo"])
def test_one_forward_per_step(catalogue, algorithm):
    model, opt = model_and_optimizer()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.0, 1.0, -1.0])
    train_step(model, opt, make_batch(catalogue, adv=adv, logp_old=torch.full((B,), -4.0)),
               weights=StepWeights(algorithm=algorithm))
    assert len(calls) == 1


def test_gen_and_logprob_equal_the_model_entry_points(catalogue):
    model, _ = model_and_optimizer()
    batch = make_batch(catalogue)
    gen, logp = gen_and_logprob(model, batch.ctx, batch.target)
    torch.testing.assert_close(gen, model.loss(batch.ctx, batch.target), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp, model.item_logprob(batch.ctx, batch.target), rtol=1e-6, atol=1e-6)


def test_step_result_reports_l_gen_and_updates_weights(catalogue):
    torch.manual_seed(0)
    model = LazyDecoder(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = make_batch(catalogue)
    with torch.no_grad():
        expect = float(model.loss(batch.ctx, batch.target))
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, opt, batch, weights=StepWeights(algorithm="sft"))
    assert result.finite and math.isclose(result.gen, expect, rel_tol=1e-5) and result.rl == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_gbpo_gradient_on_log_pi_is_the_closed_form(catalogue, monkeypatch):
    """d(rl_weight * RL)/d log pi_i = -rl_weight * A_i * pi_i / pi'_old_i / n_rows for the rows with A != 0
    (eqs. 11-12; d pi / d log pi = pi), 0 for A = 0: fed with logged log pi_old (one NaN: legacy) and A."""
    seen = record_logp_grad(monkeypatch)
    model, opt = model_and_optimizer()
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.0, 1.5, -2.0])
    logp_old = torch.tensor([-3.0, -2.5, -4.0, -12.0, -0.05, -3.0, float("nan"), -30.0])
    weights = StepWeights(algorithm="gbpo", rl_weight=0.7, sft_weight=0.0, rl_level="item", rl_normalization="active")
    result = train_step(model, opt, make_batch(catalogue, adv=adv, logp_old=logp_old), weights=weights)
    logp = seen["logp"].double()
    old = torch.where(torch.isnan(logp_old.double()), logp, logp_old.double())
    bound = torch.where(adv >= 0, logp, torch.log1p(-torch.exp(logp)))          # eq. 12
    ratio = torch.exp(logp - torch.maximum(old, bound))                          # pi / pi'_old
    rows = adv != 0
    expect = torch.where(rows, -weights.rl_weight * adv.double() * ratio / int(rows.sum()), torch.zeros_like(ratio))
    assert result.finite and result.positives == 3 and result.negatives == 3
    grad = item_grad(seen)
    torch.testing.assert_close(grad.double(), expect, rtol=1e-5, atol=1e-9)
    assert grad[rows].abs().min() > 0


def test_ecpo_gradient_on_log_pi_is_the_loss_gradient(catalogue, monkeypatch):
    seen = record_logp_grad(monkeypatch)
    model, opt = model_and_optimizer()
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.0, 1.5, -2.0])
    logp_old = torch.full((B,), -3.0)
    weights = StepWeights(algorithm="ecpo", rl_weight=2.0, sft_weight=0.0, rl_level="item", rl_normalization="active")
    train_step(model, opt, make_batch(catalogue, adv=adv, logp_old=logp_old), weights=weights)
    rows = adv != 0
    logp = seen["logp"][rows].clone().requires_grad_()
    (weights.rl_weight * ecpo_loss(logp, logp_old[rows], adv[rows], eps=0.2, delta=0.1)).backward()
    grad = item_grad(seen)
    torch.testing.assert_close(grad[rows], logp.grad, rtol=1e-5, atol=1e-8)
    assert torch.equal(grad[~rows], torch.zeros(int((~rows).sum())))


def test_sft_sends_no_gradient_to_log_pi(catalogue, monkeypatch):
    seen = record_logp_grad(monkeypatch)
    model, opt = model_and_optimizer()
    adv = torch.ones(B)
    train_step(model, opt, make_batch(catalogue, adv=adv, logp_old=torch.full((B,), -3.0)),
               weights=StepWeights(algorithm="sft", sft_weight=0.0))
    assert torch.equal(seen["tokens_grad"], torch.zeros(B, 3))
