"""GBPO and ECPO against the closed forms of eqs. 11-18 (values and gradients)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.losses import ecpo_loss, gbpo_loss, gen_loss


def reference_gbpo(pi, pi_old, adv):
    """Eqs. 11-12 written with probabilities, float64; NaN pi_old means sg(pi)."""
    out = []
    for p, po, a in zip(pi, pi_old, adv):
        po = p if math.isnan(po) else po
        bound = max(po, p) if a >= 0 else max(po, 1 - p)
        out.append(-a * p / bound)
    return sum(out) / len(out)


def reference_ecpo(pi, pi_old, adv, eps=0.2, delta=0.1):
    out = []
    for p, po, a in zip(pi, pi_old, adv):
        po = p if math.isnan(po) else po
        r = p / max(p / (1 + eps + delta), po)
        out.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
    return sum(out) / len(out)


probs = st.floats(min_value=1e-6, max_value=0.999)
rows = st.lists(st.tuples(probs, st.one_of(probs, st.just(float("nan"))), st.sampled_from([-1.0, 0.0, 1.0])),
                min_size=1, max_size=16)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_values_match_the_equations(batch):
    pi, pi_old, adv = zip(*batch)
    logp = torch.tensor([math.log(p) for p in pi], dtype=torch.float64)
    logp_old = torch.tensor([math.log(p) if not math.isnan(p) else float("nan") for p in pi_old], dtype=torch.float64)
    a = torch.tensor(adv)
    assert gbpo_loss(logp, logp_old, a).item() == pytest.approx(reference_gbpo(pi, pi_old, adv), rel=1e-4, abs=1e-6)
    assert ecpo_loss(logp, logp_old, a).item() == pytest.approx(reference_ecpo(pi, pi_old, adv), rel=1e-4, abs=1e-6)


def grad_wrt_pi(loss_fn, pi: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """d loss_i / d pi_i per element (undo the mean; chain rule through logp = log pi)."""
    logp = pi.log().clone().requires_grad_(True)
    loss_fn(logp, logp_old, adv).backward()
    return logp.grad * len(pi) / pi


def test_legacy_samples_have_ratio_one_and_eq16_gradient_for_positives():
    pi = torch.tensor([1e-6, 1e-3, 0.2, 0.7], dtype=torch.float64)
    nan = torch.full_like(pi, float("nan"))
    pos = torch.ones_like(pi)
    for fn in (gbpo_loss, ecpo_loss):
        assert fn(pi.log(), nan, pos).item() == pytest.approx(-1.0)
        # eq. 16 with A = +1, which is also BCE's y = 1 gradient (eq. 18): -1 / pi
        torch.testing.assert_close(grad_wrt_pi(fn, pi, nan, pos), -1 / pi, rtol=1e-5, atol=0)


def test_gbpo_negative_gradient_is_bce_bounded_where_ecpo_explodes():
    """Eqs. 15-18: for legacy negatives (ratio 1) ECPO's gradient is 1/pi, unbounded as pi shrinks;
    GBPO's is 1/max(pi, 1 - pi) <= 2, equal to BCE's y = 0 gradient 1/(1 - pi) for pi < 1/2."""
    pi = torch.logspace(-8, math.log10(0.99), 40, dtype=torch.float64)
    nan = torch.full_like(pi, float("nan"))
    neg = -torch.ones_like(pi)
    g_gbpo = grad_wrt_pi(gbpo_loss, pi, nan, neg)
    g_ecpo = grad_wrt_pi(ecpo_loss, pi, nan, neg)
    torch.testing.assert_close(g_ecpo, 1 / pi, rtol=1e-5, atol=0)               # eq. 16, A = -1
    torch.testing.assert_close(g_gbpo, 1 / torch.maximum(pi, 1 - pi), rtol=1e-5, atol=0)
    low = pi < 0.5
    torch.testing.assert_close(g_gbpo[low], 1 / (1 - pi[low]), rtol=1e-5, atol=0)  # eq. 18, y = 0
    assert g_gbpo.max().item() <= 2.0 + 1e-9
    assert g_ecpo.max().item() > 1e7


def test_gbpo_negative_gradient_stays_below_bce_as_pi_grows_over_logged_pi_old():
    """With a logged pi_old, the plain ratio objective's gradient in logp is pi / pi_old and grows
    without bound as pi grows; GBPO's never exceeds BCE's d(-log(1 - p))/d log p = p / (1 - p)."""
    pi_old = 1e-4
    pi = torch.logspace(-4, math.log10(0.5), 30, dtype=torch.float64)
    logp = pi.log().clone().requires_grad_(True)
    old = torch.full_like(pi, math.log(pi_old))
    gbpo_loss(logp, old, -torch.ones_like(pi)).backward()
    g_gbpo = logp.grad * len(pi)
    ratio_grad = pi / pi_old
    bce_grad = pi / (1 - pi)
    assert torch.all(g_gbpo <= bce_grad * (1 + 1e-6))
    assert torch.all(g_gbpo <= ratio_grad * (1 + 1e-6))
    assert ratio_grad[-1] > 100 * bce_grad[-1]


def test_zero_advantage_contributes_nothing():
    logp = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss = gbpo_loss(logp, torch.tensor([-2.0, float("nan")]), torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)


def test_tiny_item_probabilities_do_not_underflow():
    logp = torch.tensor([-200.0, -150.0], requires_grad=True)   # exp() would be 0 in float32
    loss = gbpo_loss(logp, torch.tensor([-201.0, float("nan")]), torch.tensor([1.0, -1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logp.grad))
    assert loss.item() == pytest.approx(-0.5 * 1.0 + 0.5 * math.exp(-150.0), abs=1e-6)


def test_bad_shapes_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="logp_old"):
        gbpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="adv"):
        ecpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4))


def test_gen_loss_is_mean_cross_entropy_over_three_positions():
    logits = torch.randn(4, 3, 7)
    target = torch.randint(0, 7, (4, 3))
    manual = -torch.log_softmax(logits, -1).gather(-1, target[..., None]).mean()
    torch.testing.assert_close(gen_loss(logits, target), manual)
