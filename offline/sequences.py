"""Sequence data for offline evaluation: the `user item item ...` format, the leave-one-out split,
item embeddings from co-occurrence, and the files `onerec eval make-sequences` writes.

Invariant: nothing of a test (or validation) item reaches training: semantic ids, item embeddings and
popularity come from the training part of each sequence only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import math

import numpy as np
import torch

from learner import metrics
from learner.config import ModelConfig

KS = (5, 10)
COOC_WINDOW = 3
EMBED_DIM = 32


# ----------------------------------------------------------------------------------- the split
def read_sequences(path: str | Path) -> dict[int, list[int]]:
    """`user_id item_id item_id ...` per line (whitespace separated, time order) -> {user: items}.

    A user on two lines has the second line appended. Bad tokens raise ValueError naming the line.
    """
    seqs: dict[int, list[int]] = {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = [int(p) for p in parts]
            except ValueError:
                raise ValueError(f"{path}: line {n}: expected integer ids, got {line.strip()[:80]!r}") from None
            if min(values) < 0:
                raise ValueError(f"{path}: line {n}: ids must be >= 0")
            seqs.setdefault(values[0], []).extend(values[1:])
    if not seqs:
        raise ValueError(f"{path}: no sequences")
    return seqs


@dataclass
class LeaveOneOut:
    """Per user: training items (all but the last two), the validation target and the test target."""

    users: np.ndarray                 # (U,)
    train: list[list[int]]            # item ids, time order
    valid_target: np.ndarray          # (U,)
    test_target: np.ndarray           # (U,)

    def test_history(self, u: int) -> list[int]:
        return self.train[u] + [int(self.valid_target[u])]

    def train_items(self) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in self.train if s]))


def leave_one_out(seqs: dict[int, list[int]], *, min_len: int = 3) -> LeaveOneOut:
    """Split users with at least `min_len` items (others are dropped: no training item to condition on)."""
    users = sorted(u for u, s in seqs.items() if len(s) >= min_len)
    if not users:
        raise ValueError(f"sequences: no user has >= {min_len} items")
    return LeaveOneOut(
        users=np.asarray(users, dtype=np.int64),
        train=[list(seqs[u][:-2]) for u in users],
        valid_target=np.asarray([seqs[u][-2] for u in users], dtype=np.int64),
        test_target=np.asarray([seqs[u][-1] for u in users], dtype=np.int64))


def cooccurrence_embeddings(train: list[list[int]], item_ids: np.ndarray, *, dim: int = EMBED_DIM,
                            window: int = COOC_WINDOW, seed: int = 0) -> np.ndarray:
    """(N, dim) unit rows: truncated SVD of the positive PMI of items co-occurring within `window`
    positions of a training sequence. Items never co-occurring get a small random vector (they still
    need a semantic id; the random part spreads them over the codebooks)."""
    n = len(item_ids)
    index = {int(v): i for i, v in enumerate(item_ids)}
    rows, cols = [], []
    for seq in train:
        idx = np.asarray([index[v] for v in seq], dtype=np.int64)
        for k in range(1, window + 1):
            a, b = idx[:-k], idx[k:]
            keep = a != b
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
    rng = np.random.default_rng(seed)
    emb = rng.normal(scale=1e-3, size=(n, dim)).astype(np.float32)
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
        key, counts = np.unique(r * n + c, return_counts=True)
        r, c = key // n, key % n
        marg = np.bincount(r, weights=counts, minlength=n)
        pmi = np.log(counts * counts.sum() / (marg[r] * marg[c]))
        keep = pmi > 0
        if keep.any():
            mat = torch.sparse_coo_tensor(np.stack([r[keep], c[keep]]), pmi[keep].astype(np.float32),
                                          (n, n), check_invariants=True).coalesce()
            q = min(dim, n - 1)
            torch.manual_seed(seed)
            u, s, _ = torch.svd_lowrank(mat, q=q, niter=4)
            emb[:, :q] += (u * s.sqrt()).numpy()
    return emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-8)


def codebook_sizes_for(n_items: int, cfg: ModelConfig) -> tuple[int, int, int]:
    """About sqrt(N) codes per level (capped by the model's codebook): level 1 groups, level 2 splits,
    level 3 resolves the rest; K^3 >> N keeps collisions rare."""
    k = int(min(cfg.codebook_size, max(4, math.ceil(math.sqrt(n_items)))))
    return (k, k, k)


def sequence_context(history: list[int], cfg: ModelConfig) -> dict:
    """Previous items as the user context: the newest `max_short` short, up to `max_long` before them
    long, zero durations / play times / flags, an all-zero profile (sequence files have no features)."""
    short = history[-cfg.max_short:]
    long = history[max(0, len(history) - cfg.max_short - cfg.max_long): max(0, len(history) - cfg.max_short)]

    def part(items: list[int]) -> dict:
        z = [0.0] * len(items)
        return {"item_id": [int(v) for v in items], "duration_s": z, "play_time_s": list(z), "flags": [0] * len(items)}

    return {"profile": [0] * cfg.profile_fields, "short": part(short), "long": part(long)}


def scores(ranked: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    out = {}
    for k in KS:
        out[f"recall@{k}"] = metrics.recall_at_k(ranked, targets, k)
        out[f"ndcg@{k}"] = metrics.ndcg_at_k(ranked, targets, k)
    return {key: out[key] for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")}


def synthetic_sequences(n_users: int, n_items: int, *, length: tuple[int, int] = (6, 20), follow: float = 0.8,
                        seed: int = 0) -> dict[int, list[int]]:
    """Sequences with a learnable pattern: each item has one fixed successor (a random permutation),
    followed with probability `follow`; otherwise the next item is drawn from a Zipf-like popularity
    (so most-popular is a fair but beatable baseline)."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    seqs = {}
    for u in range(n_users):
        n = int(rng.integers(length[0], length[1] + 1))
        items = [int(rng.choice(n_items, p=popularity))]
        for _ in range(n - 1):
            items.append(int(successor[items[-1]]) if rng.random() < follow else int(rng.choice(n_items, p=popularity)))
        seqs[u] = [i + 1 for i in items]  # ids from 1, as in the SASRec files
    return seqs


def kuairand_sequences(*, min_len: int = 5, long_view_only: bool = False) -> dict[int, list[int]]:
    """Per user, the KuaiRand week's watched videos in time order (optionally only long views),
    consecutive repeats removed; users with fewer than `min_len` items dropped."""
    from simulator import kuairand

    log = kuairand.read_log()
    keep = log.long_view == 1 if long_view_only else np.ones(len(log), dtype=bool)
    seqs: dict[int, list[int]] = {}
    for u, v in zip(log.user_id[keep].tolist(), log.video_id[keep].tolist()):
        s = seqs.setdefault(u, [])
        if not s or s[-1] != v:
            s.append(v)
    return {u: s for u, s in seqs.items() if len(s) >= min_len}


def write_sequences(seqs: dict[int, list[int]], path: str | Path) -> None:
    with open(path, "w") as f:
        for u, items in seqs.items():
            f.write(" ".join(str(x) for x in [u, *items]) + "\n")


# ----------------------------------------------------------------------------------- CLI
