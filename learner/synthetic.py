"""Synthetic catalogues and user contexts for tests and benchmarks (no data files, seeded).

Invariant: the same seed gives the same catalogue, contexts and targets, so a test that uses them
is deterministic.
"""
from __future__ import annotations

import numpy as np

from learner.config import ModelConfig
from learner.tokenizer import SemanticTokenizer


def random_catalogue(n_items: int, *, dim: int = 16, codebook_size: int = 16, seed: int = 0,
                     n_clusters: int = 8) -> tuple[np.ndarray, np.ndarray, SemanticTokenizer]:
    """Clustered item embeddings and a tokenizer fitted on them -> (item_ids, embeddings, tokenizer)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 3.0
    emb = (centers[rng.integers(0, n_clusters, n_items)] + rng.normal(size=(n_items, dim))).astype(np.float32)
    item_ids = rng.choice(10 * n_items + 100, size=n_items, replace=False).astype(np.int64)
    tok = SemanticTokenizer()
    tok.fit(item_ids, emb, codebook_sizes=(codebook_size,) * 3, seed=seed)
    return item_ids, emb, tok


def random_context(rng: np.random.Generator, cfg: ModelConfig, item_ids: np.ndarray, *,
                   n_short: int | None = None, n_long: int | None = None) -> dict:
    """One user-context dict (interfaces.md) with items drawn from item_ids."""
    n_short = int(rng.integers(1, cfg.max_short + 1)) if n_short is None else n_short
    n_long = int(rng.integers(0, cfg.max_long + 1)) if n_long is None else n_long

    def seq(n: int) -> dict:
        dur = rng.uniform(3.0, 120.0, n)
        return {"item_id": [int(x) for x in rng.choice(item_ids, n)], "duration_s": dur.tolist(),
                "play_time_s": (dur * rng.uniform(0, 1.2, n)).tolist(),
                "flags": [int(x) for x in rng.integers(0, 128, n)]}

    return {"profile": [int(x) for x in rng.integers(0, cfg.profile_vocab, cfg.profile_fields)],
            "short": seq(n_short), "long": seq(n_long)}


def learnable_task(rng: np.random.Generator, cfg: ModelConfig, item_ids: np.ndarray, n: int):
    """Contexts whose target is the item of the newest short-term behaviour: the model must learn to copy.

    -> (contexts, target item ids (n,))."""
    contexts = [random_context(rng, cfg, item_ids) for _ in range(n)]
    targets = np.asarray([c["short"]["item_id"][-1] for c in contexts], dtype=np.int64)
    return contexts, targets


def random_code_tokenizer(n_items: int, codebook_size: int, *, dim: int = 8, seed: int = 0) -> SemanticTokenizer:
    """A tokenizer with random, unique codes and random centroids - no k-means - for preset-scale
    benchmarks (codebook 8192), where only the id <-> code maps and the trie matter."""
    import torch

    rng = np.random.default_rng(seed)
    k = codebook_size
    if n_items > k ** 3:
        raise ValueError(f"n_items: {n_items} exceed the {k}^3 code space")
    if k ** 3 <= 10_000_000:
        keys = rng.choice(k ** 3, size=n_items, replace=False).astype(np.int64)
    else:   # sparse: draw with repeats, keep the distinct ones
        keys = np.unique(rng.integers(0, k ** 3, size=int(n_items * 1.1) + 16, dtype=np.int64))
        keys = rng.permutation(keys)[:n_items]
    codes = np.stack([keys // (k * k), (keys // k) % k, keys % k], axis=1)
    tensors = {f"centroids_{i}": torch.from_numpy(rng.normal(size=(k, dim)).astype(np.float32)) for i in range(3)}
    tensors["item_ids"] = torch.arange(n_items, dtype=torch.int64)
    tensors["codes"] = torch.from_numpy(codes)
    tensors["codebook_sizes"] = torch.tensor([k, k, k])
    return SemanticTokenizer.from_tensors(tensors)
