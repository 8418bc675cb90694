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


# ---- token level vs item level (rl_rows), closed forms -------------------------------------------
from learner.losses import plain_ratio_objective, rl_rows, token_logp_old  # noqa: E402

token_probs = st.floats(min_value=1e-4, max_value=0.99)
token_rows = st.lists(st.tuples(st.tuples(token_probs, token_probs, token_probs),
                                st.one_of(st.floats(min_value=-30.0, max_value=-0.01), st.just(float("nan"))),
                                st.sampled_from([-1.0, 0.0, 1.0])),
                      min_size=1, max_size=12)


def reference_token_rows(objective, p, item_old, adv, eps=0.2, delta=0.1):
    """Per row: mean over the 3 tokens of the objective with token pi_old = p_i * (pi_old / prod p)^(1/3)."""
    out = []
    for ps, lo, a in zip(p, item_old, adv):
        drift = 0.0 if math.isnan(lo) else (lo - sum(math.log(x) for x in ps)) / 3
        terms = []
        for x in ps:
            po = x * math.exp(drift)
            if objective == "gbpo":
                terms.append(-a * x / (max(po, x) if a >= 0 else max(po, 1 - x)))       # eqs. 11-12
            elif objective == "ecpo":
                r = x / max(x / (1 + eps + delta), po)                                    # eq. 14
                terms.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))              # eq. 13
            else:
                terms.append(-a * x / po)
        out.append(sum(terms) / 3)
    return out


@settings(max_examples=60, deadline=None)
@given(token_rows, st.sampled_from(["gbpo", "ecpo", "plain_ratio"]))
def test_token_level_values_and_gradients_match_the_closed_form(batch, objective):
    """Values per row, and d row / d log p_i = per-token closed form / 3 (GBPO: -A r_i, the bound
    being a stop-gradient; plain ratio: -A r_i; ECPO: -A r_i inside the clip, 0 where clipped)."""
    p, item_old, adv = zip(*batch)
    logp = torch.tensor([[math.log(x) for x in ps] for ps in p], dtype=torch.float64, requires_grad=True)
    old, a = torch.tensor(item_old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    rows_ = rl_rows(objective, logp, old, a, level="token")
    want = reference_token_rows(objective, p, item_old, adv)
    assert rows_.tolist() == pytest.approx(want, rel=2e-5, abs=1e-7)
    rows_.sum().backward()
    for n, (ps, lo, av) in enumerate(zip(p, item_old, adv)):
        drift = 0.0 if math.isnan(lo) else (lo - sum(math.log(x) for x in ps)) / 3
        for i, x in enumerate(ps):
            po = x * math.exp(drift)
            if objective == "gbpo":
                g = -av * x / (max(po, x) if av >= 0 else max(po, 1 - x))
            elif objective == "plain_ratio":
                g = -av * x / po
            else:
                r = x / max(x / 1.3, po)
                clipped = (av > 0 and r > 1.2) or (av < 0 and r < 0.8)
                g = 0.0 if clipped else -av * r
            assert logp.grad[n, i].item() == pytest.approx(g / 3, rel=2e-5, abs=1e-7)


@settings(max_examples=50, deadline=None)
@given(token_rows, st.sampled_from(["gbpo", "ecpo"]))
def test_item_level_is_the_objective_on_the_product_of_the_three(batch, objective):
    p, item_old, adv = zip(*batch)
    logp = torch.tensor([[math.log(x) for x in ps] for ps in p], dtype=torch.float64)
    old, a = torch.tensor(item_old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    pi = [ps[0] * ps[1] * ps[2] for ps in p]
    pi_old = [math.exp(lo) if not math.isnan(lo) else float("nan") for lo in item_old]
    ref = reference_gbpo if objective == "gbpo" else reference_ecpo
    got = rl_rows(objective, logp, old, a, level="item").tolist()
    for n in range(len(pi)):
        assert got[n] == pytest.approx(ref([pi[n]], [pi_old[n]], [adv[n]]), rel=1e-5, abs=1e-9)


def test_token_pi_old_multiplies_to_the_logged_item_pi_old():
    logp = torch.log(torch.tensor([[0.5, 0.1, 0.9], [0.01, 0.2, 0.3]], dtype=torch.float64))
    item_old = torch.tensor([-4.0, float("nan")], dtype=torch.float64)
    old = token_logp_old(logp, item_old)
    assert old[0].sum().item() == pytest.approx(-4.0)
    assert torch.isnan(old[1]).all()                      # legacy stays legacy: pi_old = sg(p_i) per token
    per_token = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    assert torch.equal(token_logp_old(logp[:1], per_token), per_token)


def test_token_level_negatives_act_where_item_level_ones_vanish():
    """The default's reason: legacy negatives (ratio 1) at realistic token probabilities 0.05-0.5.
    Item level: d/d log pi = pi / (1 - pi) = 5e-3 on each token; token level: p_i / (1 - p_i) / 3."""
    p = torch.tensor([[0.05, 0.2, 0.5]], dtype=torch.float64)
    nan, neg = torch.tensor([float("nan")], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    grads = {}
    for level in ("item", "token"):
        logp = p.log().requires_grad_(True)
        rl_rows("gbpo", logp, nan, neg, level=level).sum().backward()
        grads[level] = logp.grad[0]
    pi = float(p.prod())
    assert grads["item"].tolist() == pytest.approx([pi / (1 - pi)] * 3, rel=1e-5)
    assert grads["token"].tolist() == pytest.approx((p / (1 - p) / 3)[0].tolist(), rel=1e-5)
    assert grads["token"].sum() > 20 * grads["item"].sum()       # 0.43 vs 0.015 in total


def test_plain_ratio_has_no_bound_on_negatives():
    """-A pi / pi_old: a negative whose pi grew 100x over pi_old gets gradient 100 on log pi."""
    logp = torch.tensor([math.log(0.5)], dtype=torch.float64, requires_grad=True)
    plain_ratio_objective(logp, torch.tensor([math.log(0.005)], dtype=torch.float64),
                          torch.tensor([-1.0], dtype=torch.float64)).sum().backward()
    assert logp.grad.item() == pytest.approx(100.0)


def test_rl_rows_rejects_bad_level_and_shapes():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="level"):
        rl_rows("gbpo", logp, torch.zeros(2), torch.zeros(2), level="sequence")
    with pytest.raises(ValueError, match="objective"):
        rl_rows("ppo", logp, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="logp_old"):
        rl_rows("gbpo", logp, torch.zeros(3), torch.zeros(2))
