"""learner.metrics on hand-built cases with known answers."""
import math

import numpy as np
import pytest
import torch

from learner import metrics


def test_recall_and_ndcg_leave_one_out():
    ranked = np.array([[5, 1, 2, 3],    # target 1 at rank 2
                       [7, 8, 9, 4],    # target 4 at rank 4
                       [0, 2, 3, 6]])   # target 9 missing
    target = np.array([1, 4, 9])
    assert metrics.recall_at_k(ranked, target, 1) == 0.0
    assert metrics.recall_at_k(ranked, target, 2) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(ranked, target, 4) == pytest.approx(2 / 3)
    expected = (1 / math.log2(3) + 1 / math.log2(5) + 0) / 3
    assert metrics.ndcg_at_k(ranked, target, 4) == pytest.approx(expected)
    assert metrics.ndcg_at_k(ranked, target, 2) == pytest.approx(1 / math.log2(3) / 3)
    per_row = metrics.ndcg_at_k(torch.tensor(ranked), torch.tensor(target), 4, reduce=False)
    np.testing.assert_allclose(per_row, [1 / math.log2(3), 1 / math.log2(5), 0.0])


def test_recall_and_ndcg_with_several_relevant_items():
    ranked = [[1, 2, 3, 4, 5]]
    relevant = [{2, 5, 99}]
    assert metrics.recall_at_k(ranked, relevant, 5) == pytest.approx(2 / 3)
    assert metrics.hit_rate_at_k(ranked, relevant, 1) == 0.0
    assert metrics.hit_rate_at_k(ranked, relevant, 2) == 1.0
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics.ndcg_at_k(ranked, relevant, 5) == pytest.approx(dcg / idcg)
    # perfect ranking scores 1; rows without relevant items are left out of the mean
    assert metrics.ndcg_at_k([[3, 4], [1, 2]], [{3, 4}, set()], 2) == pytest.approx(1.0)


def test_repeated_ids_count_once():
    assert metrics.ndcg_at_k([[1, 1, 2]], [{1, 2}], 3) == pytest.approx(
        (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_ranking_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="ranked"):
        metrics.recall_at_k(np.arange(3), np.arange(3), 1)
    with pytest.raises(ValueError, match="rows"):
        metrics.recall_at_k(np.zeros((2, 3)), np.arange(3), 1)
    with pytest.raises(ValueError, match="k must"):
        metrics.ndcg_at_k(np.zeros((2, 3)), np.arange(2), 0)


def test_kl_and_entropy_known_values():
    assert metrics.kl_divergence([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert metrics.kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert metrics.kl_divergence([0.5, 0.5], [0.9, 0.1]) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    rows = metrics.kl_divergence(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.5, 0.5], [0.5, 0.5]]))
    np.testing.assert_allclose(rows, [math.log(2), 0.0], atol=1e-12)
    # unnormalised input is renormalised
    assert metrics.kl_divergence([2.0, 2.0], [1.0, 3.0]) == pytest.approx(
        0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert metrics.entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert metrics.entropy([0.25] * 4, base=2) == pytest.approx(2.0)
    assert metrics.entropy([1.0, 0.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.kl_divergence([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.entropy([-0.1, 1.1])


def test_kl_from_logprobs_of_two_top_k_lists():
    lp = np.log([0.6, 0.4])
    assert metrics.kl_from_logprobs([1, 2], lp, [2, 1], lp[::-1]) == pytest.approx(0.0)
    # q misses item 2 entirely: eps mass, large but finite
    kl = metrics.kl_from_logprobs([1, 2], lp, [1], [0.0], eps=1e-6)
    assert 0.4 * math.log(0.4 / 1e-6) * 0.9 < kl < 10
    # unnormalised beam logprobs are renormalised over the list
    assert metrics.kl_from_logprobs([1, 2], [-1.0, -1.0], [1, 2], [-5.0, -5.0]) == pytest.approx(0.0)


def test_gini_and_coverage():
    assert metrics.gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert metrics.gini([0, 0, 0, 10]) == pytest.approx(0.75)  # (n - 1) / n for one item taking all
    assert metrics.gini([1, 2, 3]) == pytest.approx((-2 * 1 + 0 * 2 + 2 * 3) / (3 * 6))
    assert metrics.gini(np.zeros(4)) == 0.0
    assert metrics.coverage([1, 1, 2, -1], 10) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="counts"):
        metrics.gini([-1, 2])
