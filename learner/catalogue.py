"""The item catalogue a deployment serves from: the seam between a platform's own items and the model.

Invariant: whoever starts serving or training hands over one `ItemCatalogue`; nothing that serves or
trains reads a data set itself. The embedded world builds it from KuaiRand
(`simulator.kuairand.item_catalogue()`); a platform team builds it from its own item table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from learner.tokenizer import SemanticTokenizer


@dataclass(frozen=True)
class ItemCatalogue:
    """Item ids (N,), durations in seconds (N,) and embeddings (N, D) that semantic ids are fitted on."""

    item_ids: np.ndarray
    durations_s: np.ndarray
    embeddings: np.ndarray
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.durations_s.shape != (n,) or self.embeddings.ndim != 2 or len(self.embeddings) != n:
            raise ValueError(f"ItemCatalogue: item_ids ({n},), durations_s {self.durations_s.shape} and "
                             f"embeddings {self.embeddings.shape} must agree on the number of items")
        if n == 0:
            raise ValueError("ItemCatalogue: no items")
        if len(np.unique(self.item_ids)) != n:
            raise ValueError("ItemCatalogue: item_ids must be unique")
        self._index.update({int(i): k for k, i in enumerate(self.item_ids.tolist())})

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._index

    def duration_of(self, item_id: int) -> float:
        """Seconds; 0.0 for an item the catalogue does not hold."""
        k = self._index.get(int(item_id))
        return 0.0 if k is None else float(self.durations_s[k])

    def durations(self) -> dict[int, float]:
        return {int(i): float(d) for i, d in zip(self.item_ids.tolist(), self.durations_s.tolist())}

    def fit_tokenizer(self, codebook_size: int) -> SemanticTokenizer:
        """RQ-KMeans semantic ids, `codebook_size` codes per level (seconds on 2 cores for ~10k items)."""
        tok = SemanticTokenizer()
        tok.fit(self.item_ids, self.embeddings, codebook_sizes=(codebook_size,) * 3)
        return tok
