"""Reward shaping (section 3.1.1) against hand-computed cases; numpy and torch agree."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.reward import EMPTY_HISTORY_SCORE, advantages, duration_bucket, engagement_score


def test_duration_bucket_hand_computed():
    d = np.array([0.0, 0.5, 1.0, 1.9, 2.0, 3.0, 8.0, 100.0])
    # floor(log2(d + 1e-6)): 0 -> log2(1e-6) = -19.93 -> -20; 0.5 -> -1; 1 -> 0; 1.9 -> 0; 2 -> 1; 3 -> 1; 8 -> 3; 100 -> 6
    expected = np.array([-20, -1, 0, 0, 1, 1, 3, 6])
    out = duration_bucket(d, beta=2.0)
    assert out.dtype == np.int64 and np.array_equal(out, expected)
    t = duration_bucket(torch.tensor(d), beta=2.0)
    assert t.dtype == torch.long and torch.equal(t, torch.tensor(expected))
    # beta 10: 9 s and 10 s straddle a bucket edge
    assert duration_bucket(np.array([9.0, 10.0, 99.0, 100.0]), beta=10.0).tolist() == [0, 1, 1, 2]


def test_duration_bucket_rejects_bad_input():
    with pytest.raises(ValueError, match="beta"):
        duration_bucket(np.array([1.0]), beta=1.0)
    with pytest.raises(ValueError, match="duration_s"):
        duration_bucket(np.array([-1.0]), beta=2.0)


def test_engagement_score_hand_computed():
    history = [3.0, 10.0, 10.0, 25.0]
    # |{p <= x}| / 4
    assert engagement_score(history, 2.0) == 0.0
    assert engagement_score(history, 3.0) == 0.25
    assert engagement_score(history, 10.0) == 0.75     # ties count (p_j <= p_i)
    assert engagement_score(history, 30.0) == 1.0
    out = engagement_score(np.array(history), np.array([2.0, 10.0, 30.0]))
    assert isinstance(out, np.ndarray) and out.tolist() == [0.0, 0.75, 1.0]
    t = engagement_score(torch.tensor(history), torch.tensor([2.0, 10.0, 30.0]))
    assert isinstance(t, torch.Tensor) and t.tolist() == [0.0, 0.75, 1.0]


def test_engagement_score_empty_history_is_neutral():
    assert EMPTY_HISTORY_SCORE == 0.5
    assert engagement_score([], 7.0) == 0.5
    assert engagement_score(np.array([]), np.array([1.0, 2.0])).tolist() == [0.5, 0.5]
    assert engagement_score(torch.tensor([]), torch.tensor([1.0])).tolist() == [0.5]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e4), max_size=30), st.floats(0, 1e4))
def test_engagement_score_matches_definition(history, play):
    expected = sum(p <= play for p in history) / len(history) if history else EMPTY_HISTORY_SCORE
    assert engagement_score(history, play) == pytest.approx(expected)
    assert float(engagement_score(torch.tensor(history, dtype=torch.float64), torch.tensor(play, dtype=torch.float64))) \
        == pytest.approx(expected)


def test_advantages_hand_computed():
    q = np.array([0.1, 0.5, 0.9, 1.0, 0.3, 0.95])
    dislike = np.array([0, 0, 0, 1, 0, 0], dtype=bool)
    # tau = quantile(q, 0.75), linear: sorted [.1 .3 .5 .9 .95 1.0], pos 3.75 -> .9 + .75 * .05 = 0.9375
    assert np.quantile(q, 0.75) == pytest.approx(0.9375)
    expected = [0.0, 0.0, 0.0, -1.0, 0.0, 1.0]    # 1.0 is disliked -> -1; 0.95 > tau -> +1
    assert advantages(q, dislike).tolist() == expected
    t = advantages(torch.tensor(q, dtype=torch.float32), torch.tensor(dislike))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.tolist() == expected
    # ties at tau are not > tau
    assert advantages(np.array([0.5, 0.5, 0.5, 0.5]), np.zeros(4, bool)).tolist() == [0, 0, 0, 0]
    # top_fraction 0.5: tau = median
    assert advantages(np.array([0.1, 0.2, 0.3, 0.4]), np.zeros(4, bool), top_fraction=0.5).tolist() == [0, 0, 1, 1]


def test_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        advantages(np.array([0.1, np.nan]), np.zeros(2, bool))
    with pytest.raises(ValueError, match="same"):
        advantages(np.array([0.1, 0.2]), np.zeros(3, bool))
    with pytest.raises(ValueError, match="top_fraction"):
        advantages(np.array([0.1]), np.zeros(1, bool), top_fraction=1.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e4) | st.integers(0, 10_000).map(float), max_size=40),
       st.floats(0, 1e4) | st.integers(0, 10_000))
def test_the_joins_engagement_q_equals_the_reference(history, play):
    """The join (streaming/history.py) scores one play time without a sort; it must give the reference's q bit for bit."""
    from streaming.history import engagement_q

    q = engagement_q(np.asarray(history, dtype=np.float64), play)
    assert type(q) is float and q == float(engagement_score(history, play))


def test_ties_at_tau_are_not_positive_and_numpy_torch_agree():
    """q == tau_B is not positive (strict >): with half the q at 1, tau_B = 1 and nothing is above it."""
    from streaming.reward import tau_threshold
    q = np.array([1.0, 1.0, 1.0, 1.0, 0.2, 0.4, 0.6, 0.8])
    dis = np.zeros(8, dtype=bool)
    assert tau_threshold(q) == 1.0
    assert advantages(q, dis).tolist() == [0.0] * 8
    # an explicit tau: ties with it are not positive, above it are; both backends agree
    q2 = np.array([0.5, 0.75, 0.76, 1.0])
    want = [0.0, 0.0, 1.0, 1.0]
    assert advantages(q2, np.zeros(4, dtype=bool), tau=0.75).tolist() == want
    assert advantages(torch.tensor(q2), torch.zeros(4, dtype=torch.bool), tau=0.75).tolist() == want


def test_single_sample_without_a_window_is_its_own_tau():
    assert advantages(np.array([1.0]), np.array([False])).tolist() == [0.0]
    assert advantages(np.array([1.0]), np.array([False]), tau=0.9).tolist() == [1.0]
    with pytest.raises(ValueError, match="at least one"):
        from streaming.reward import tau_threshold
        tau_threshold([])
