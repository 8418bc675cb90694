"""Offline and drift metrics as pure functions of arrays (numpy or torch in, Python floats / numpy out).

Invariant: no state, no I/O; every function checks its inputs and names the bad argument.

- Ranking: `recall_at_k`, `ndcg_at_k`, `hit_rate_at_k` over ranked item ids (B, >=k) and each row's
  relevant items (one id per row, or a collection per row).
- Distributions: `kl_divergence(p, q)` and `entropy(p)` over the last axis, in nats.
- Exposure: `gini(counts)` (0 = every item shown equally, -> 1 = one item takes all), `coverage`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().to("cpu").float().numpy() if x.is_floating_point() else x.detach().to("cpu").numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got ragged or object data")
    return arr


def _relevant_sets(relevant, n_rows: int) -> list[set[int]]:
    """One set of relevant ids per row, from (B,) ids or a sequence of collections."""
    if hasattr(relevant, "detach") or (isinstance(relevant, np.ndarray) and relevant.dtype != object):
        arr = _to_numpy(relevant, "relevant")
        if arr.ndim != 1:
            raise ValueError(f"relevant must be (B,) item ids or a list of collections, got shape {arr.shape}")
        sets = [{int(v)} for v in arr.tolist()]
    else:
        sets = [set(int(v) for v in (row if isinstance(row, Iterable) else [row])) for row in relevant]
    if len(sets) != n_rows:
        raise ValueError(f"relevant has {len(sets)} rows but ranked has {n_rows}")
    return sets


def _check_ranked(ranked, k: int) -> np.ndarray:
    arr = _to_numpy(ranked, "ranked")
    if arr.ndim != 2:
        raise ValueError(f"ranked must be (B, K) item ids, got shape {arr.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return arr[:, :k]


def recall_at_k(ranked, relevant, k: int, *, reduce: bool = True):
    """|top-k ∩ relevant| / |relevant| per row (rows with nothing relevant are skipped in the mean).

    With one relevant item per row (leave-one-out) this is the hit rate, the "Recall@K" of
    SASRec/TIGER tables. ranked (B, >=k); fewer than k columns counts missing slots as misses.
    """
    top = _check_ranked(ranked, k)
    sets = _relevant_sets(relevant, top.shape[0])
    per_row = np.array([len(rel.intersection(row.tolist())) / len(rel) if rel else np.nan
                        for row, rel in zip(top, sets)])
    return _reduce(per_row, reduce)


def hit_rate_at_k(ranked, relevant, k: int, *, reduce: bool = True):
    """1 if any relevant item is in the top k, per row."""
    top = _check_ranked(ranked, k)
    sets = _relevant_sets(relevant, top.shape[0])
    per_row = np.array([float(bool(rel.intersection(row.tolist()))) if rel else np.nan
                        for row, rel in zip(top, sets)])
    return _reduce(per_row, reduce)


def ndcg_at_k(ranked, relevant, k: int, *, reduce: bool = True):
    """DCG / ideal DCG with binary gains: sum over hits at rank r (1-based) of 1 / log2(r + 1).

    The ideal places min(|relevant|, k) hits first. One relevant item at rank r gives 1 / log2(r + 1).
    A repeated id in the ranking counts once (its first position).
    """
    top = _check_ranked(ranked, k)
    sets = _relevant_sets(relevant, top.shape[0])
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    per_row = np.full(top.shape[0], np.nan)
    for b, (row, rel) in enumerate(zip(top, sets)):
        if not rel:
            continue
        seen: set[int] = set()
        dcg = 0.0
        for r, item in enumerate(row.tolist()):
            if item in rel and item not in seen:
                dcg += discounts[r]
            seen.add(item)
        per_row[b] = dcg / discounts[: min(len(rel), k)].sum()
    return _reduce(per_row, reduce)


def _reduce(per_row: np.ndarray, reduce: bool):
    if not reduce:
        return per_row
    valid = per_row[~np.isnan(per_row)]
    return float(valid.mean()) if len(valid) else float("nan")


def _check_distribution(p, name: str) -> np.ndarray:
    arr = _to_numpy(p, name).astype(np.float64)
    if arr.ndim < 1 or arr.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis, got shape {arr.shape}")
    if (arr < 0).any() or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite and non-negative")
    total = arr.sum(axis=-1, keepdims=True)
    if (total <= 0).any():
        raise ValueError(f"{name} has a row summing to 0")
    return arr / total  # normalised along the last axis


def kl_divergence(p, q, *, eps: float = 1e-12):
    """KL(p || q) = sum_i p_i log(p_i / q_i) in nats over the last axis (rows renormalised).

    Terms with p_i = 0 contribute 0; q_i is floored at eps so a support mismatch gives a large finite
    value instead of inf. Returns a float for 1-D input, else an array over the leading axes.
    """
    p_arr, q_arr = _check_distribution(p, "p"), _check_distribution(q, "q")
    if p_arr.shape != q_arr.shape:
        raise ValueError(f"p {p_arr.shape} and q {q_arr.shape} must have the same shape")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_arr > 0, p_arr * (np.log(p_arr) - np.log(np.maximum(q_arr, eps))), 0.0)
    out = terms.sum(axis=-1)
    return float(out) if out.ndim == 0 else out


def kl_from_logprobs(ids_p: Sequence[int], logp: Sequence[float], ids_q: Sequence[int],
                     logq: Sequence[float], *, eps: float = 1e-6) -> float:
    """KL(p || q) between two top-k lists (item ids with log-probabilities), each renormalised over
    its own list; an item of p missing from q gets probability eps in q (then q renormalised).

    This is how the drift monitor compares two weight versions' beam-search outputs.
    """
    lp, lq = np.asarray(logp, dtype=np.float64), np.asarray(logq, dtype=np.float64)
    if len(ids_p) != len(lp) or len(ids_q) != len(lq):
        raise ValueError("ids and logprobs must have the same length")
    if len(lp) == 0 or len(lq) == 0:
        raise ValueError("top-k lists must not be empty")
    p_of = dict(zip((int(i) for i in ids_p), _softmax(lp)))
    q_of = dict(zip((int(i) for i in ids_q), _softmax(lq)))
    support = list(dict.fromkeys(list(p_of) + list(q_of)))
    p_full = np.array([p_of.get(i, 0.0) for i in support])
    q_full = np.array([q_of.get(i, eps) for i in support])
    return float(kl_divergence(p_full, q_full))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def entropy(p, *, base: float | None = None):
    """Shannon entropy -sum p log p over the last axis (nats, or log base `base`)."""
    arr = _check_distribution(p, "p")
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(arr > 0, arr * np.log(arr), 0.0).sum(axis=-1)
    if base is not None:
        h = h / np.log(base)
    return float(h) if h.ndim == 0 else h


def gini(counts) -> float:
    """Gini coefficient of non-negative exposure counts over a catalogue (include zeros for unexposed
    items): sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending. 0 = perfectly even."""
    x = np.sort(_to_numpy(counts, "counts").astype(np.float64).reshape(-1))
    if len(x) == 0:
        raise ValueError("counts must not be empty")
    if (x < 0).any():
        raise ValueError("counts must be non-negative")
    total = x.sum()
    if total == 0:
        return 0.0
    n = len(x)
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def coverage(item_ids, catalogue_size: int) -> float:
    """Share of the catalogue that appears at least once in item_ids."""
    if catalogue_size < 1:
        raise ValueError(f"catalogue_size must be >= 1, got {catalogue_size}")
    ids = _to_numpy(item_ids, "item_ids").reshape(-1)
    return float(len(np.unique(ids[ids >= 0])) / catalogue_size)
