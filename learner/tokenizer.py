"""Semantic-id tokenizer: residual k-means (RQ-KMeans, OneRec-V1) with 3 levels.

Invariant: every known item has exactly one 3-token id and no two items share one, so a
generated id names at most one item and beam search over the prefix trie returns distinct items.
An item's id never changes once given: `add_items` places new items against the frozen codebooks.

Fit: level-1 k-means on the embeddings, level-2 on the residuals, level-3 on the second residuals.
Two items that land on the same (s1, s2, s3) collide; the later one (farther from its level-3
centroid) moves to the nearest free level-3 code under the same (s1, s2), then, if that prefix is
full, to the nearest free (s2, s3) under the same s1, then anywhere free. The fit reports the
collision rate (items that had to move) and each level's codebook utilization.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@dataclass(frozen=True)
class FitReport:
    n_items: int
    codebook_sizes: tuple[int, int, int]
    collision_rate: float               # fraction of items whose raw code was taken and had to move
    utilization: tuple[float, float, float]  # used codes / codebook size, per level
    n_unique_prefixes: tuple[int, int]  # distinct s1, distinct (s1, s2)
    reconstruction_mse: float           # mean squared error of the 3-level reconstruction (raw codes)

    def as_dict(self) -> dict:
        return {"n_items": self.n_items, "codebook_sizes": list(self.codebook_sizes),
                "collision_rate": self.collision_rate, "utilization": list(self.utilization),
                "n_unique_prefixes": list(self.n_unique_prefixes),
                "reconstruction_mse": self.reconstruction_mse}


def kmeans(x: torch.Tensor, k: int, *, n_iter: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means from k distinct data points; empty clusters restart at the worst-fit points.

    With fewer points than clusters every point gets its own centroid and the rest copy points
    (they stay unused; utilization reports it)."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if n <= k:
        extra = torch.randint(0, n, (k - n,), generator=gen)
        return torch.cat([x, x[extra]], dim=0).clone()
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()  # (k, D)
    for _ in range(n_iter):
        dist = _sq_dist(x, centroids)             # (n, k)
        best_d, assign = dist.min(dim=1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        empty = torch.nonzero(~nonempty).flatten()
        if len(empty):
            worst = torch.topk(best_d, len(empty)).indices
            centroids[empty] = x[worst]
    return centroids


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, D), (k, D) -> (n, k) squared euclidean distances."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0.0)


class SemanticIdTrie:
    """Prefix trie over valid (s1, s2, s3) as sorted key arrays: children of many prefixes at once."""

    def __init__(self, codes: np.ndarray, codebook_sizes: tuple[int, int, int], item_ids: np.ndarray):
        k1, k2, k3 = codebook_sizes
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64)).reshape(-1, 3)
        if len(codes) == 0:
            raise ValueError("trie: no items")
        self.codebook_sizes = codebook_sizes
        self.n_items = int(codes.shape[0])
        full = (codes[:, 0] * k2 + codes[:, 1]) * k3 + codes[:, 2]
        order = torch.argsort(full)
        self.level_keys = [
            torch.unique(codes[:, 0]),                                          # valid s1
            torch.unique(codes[:, 0] * k2 + codes[:, 1]),                       # valid (s1, s2)
            full[order],                                                        # valid items
        ]
        if len(torch.unique(full)) != len(full):
            raise ValueError("trie: two items share a semantic id")
        self.item_of_key = torch.as_tensor(np.asarray(item_ids, dtype=np.int64))[order]

    @property
    def device(self) -> torch.device:
        return self.level_keys[0].device

    def to(self, device: torch.device | str) -> "SemanticIdTrie":
        self.level_keys = [k.to(device) for k in self.level_keys]
        self.item_of_key = self.item_of_key.to(device)
        return self

    def items(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., 3) codes -> (...) item ids, -1 where no item has that id."""
        _, k2, k3 = self.codebook_sizes
        key = (codes[..., 0] * k2 + codes[..., 1]) * k3 + codes[..., 2]
        keys = self.level_keys[2]
        pos = torch.searchsorted(keys, key.reshape(-1)).clamp_max(len(keys) - 1).reshape(key.shape)
        return torch.where(keys[pos] == key, self.item_of_key[pos], -1)

    def children(self, level: int, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid next tokens at `level` (0, 1, 2) for each prefix row.

        prefix: (W, level) long. Returns (row (M,), token (M,)): row w may continue with token.
        """
        if prefix.dim() != 2 or prefix.shape[1] != level:
            raise ValueError(f"prefix: expected shape (W, {level}), got {tuple(prefix.shape)}")
        keys = self.level_keys[level]
        if level == 0:
            w = prefix.shape[0]
            rows = torch.arange(w, device=keys.device).repeat_interleave(len(keys))
            return rows, keys.repeat(w)
        size = self.codebook_sizes[level]
        parent = prefix[:, 0] if level == 1 else prefix[:, 0] * self.codebook_sizes[1] + prefix[:, 1]
        lo = torch.searchsorted(keys, parent * size)
        hi = torch.searchsorted(keys, (parent + 1) * size)
        counts = hi - lo                                        # (W,)
        rows = torch.arange(len(parent), device=keys.device).repeat_interleave(counts)
        starts = torch.repeat_interleave(lo - torch.cumsum(counts, 0) + counts, counts)
        idx = starts + torch.arange(int(counts.sum()), device=keys.device)
        return rows, keys[idx] - parent[rows] * size

    def contains(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) bool: is this a valid item id."""
        _, k2, k3 = self.codebook_sizes
        key = (codes[:, 0] * k2 + codes[:, 1]) * k3 + codes[:, 2]
        keys = self.level_keys[2]
        pos = torch.searchsorted(keys, key).clamp_max(len(keys) - 1)
        return keys[pos] == key


class SemanticTokenizer:
    """item id <-> (s1, s2, s3). See the module docstring for the fit and collision rule."""

    def __init__(self) -> None:
        self.codebook_sizes: tuple[int, ...] = ()
        self.centroids: list[torch.Tensor] = []       # per level (K_l, D) float32
        self.item_ids = np.zeros(0, dtype=np.int64)   # (N,) in order of addition
        self.codes = np.zeros((0, 3), dtype=np.int64)  # (N, 3)
        self._rebuild_index()

    # ------------------------------------------------------------------ fit and add
    def fit(self, item_ids, embeddings, codebook_sizes=(64, 64, 64), *, n_iter: int = 20,
            seed: int = 0) -> FitReport:
        ids, emb = self._check_items(item_ids, embeddings, fitting=True)
        if len(codebook_sizes) != 3 or any(int(k) < 2 for k in codebook_sizes):
            raise ValueError(f"codebook_sizes: expected 3 sizes >= 2, got {codebook_sizes}")
        sizes = tuple(int(k) for k in codebook_sizes)
        if len(ids) > sizes[0] * sizes[1] * sizes[2]:
            raise ValueError(f"item_ids: {len(ids)} items exceed the {sizes} code space")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("item_ids: duplicate ids")
        x = torch.from_numpy(emb)
        residual = x.clone()
        self.centroids = []
        for level, k in enumerate(sizes):
            c = kmeans(residual, k, n_iter=n_iter, seed=seed + level)
            assign = _sq_dist(residual, c).argmin(1)
            residual = residual - c[assign]
            self.centroids.append(c)
        self.codebook_sizes = sizes
        self.item_ids = np.zeros(0, dtype=np.int64)
        self.codes = np.zeros((0, 3), dtype=np.int64)
        moved = self._assign(ids, x)
        used = [len(np.unique(self.codes[:, level])) / sizes[level] for level in range(3)]
        raw = self._raw_codes(x)
        recon = sum(self.centroids[level][raw[:, level]] for level in range(3))
        return FitReport(
            n_items=len(ids), codebook_sizes=sizes, collision_rate=moved / max(1, len(ids)),
            utilization=tuple(float(u) for u in used),
            n_unique_prefixes=(len(np.unique(self.codes[:, 0])),
                               len(np.unique(self.codes[:, 0] * sizes[1] + self.codes[:, 1]))),
            reconstruction_mse=float(((x - recon) ** 2).sum(1).mean()))

    def add_items(self, item_ids, embeddings) -> np.ndarray:
        """Give new items ids against the frozen codebooks (no refit); known ids keep theirs.

        Returns the (N, 3) codes of all the given items."""
        if not self.centroids:
            raise ValueError("tokenizer: not fitted; call fit first")
        ids, emb = self._check_items(item_ids, embeddings, fitting=False)
        known = self.lookup(ids)[1]
        new_ids, first = np.unique(ids[~known], return_index=True)
        if len(new_ids):
            if len(self.item_ids) + len(new_ids) > int(np.prod(self.codebook_sizes)):
                raise ValueError("item_ids: the code space is full")
            self._assign(ids[~known][first], torch.from_numpy(emb[~known][first]))
        return self.codes_for(ids)

    def _raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        residual = x.clone()
        out = []
        for c in self.centroids:
            a = _sq_dist(residual, c).argmin(1)
            residual = residual - c[a]
            out.append(a)
        return torch.stack(out, 1)

    def _assign(self, ids: np.ndarray, x: torch.Tensor) -> int:
        """Code new items, resolving collisions; returns how many had to move."""
        k1, k2, k3 = self.codebook_sizes
        raw = self._raw_codes(x)                                          # (n, 3)
        c1, c2, c3 = self.centroids
        res2 = x - c1[raw[:, 0]] - c2[raw[:, 1]]                          # residual before level 3
        fit3 = ((res2 - c3[raw[:, 2]]) ** 2).sum(1)
        taken = set(((self.codes[:, 0] * k2 + self.codes[:, 1]) * k3 + self.codes[:, 2]).tolist())
        new_codes = raw.numpy().copy()
        moved = 0
        for i in torch.argsort(fit3).tolist():                            # best-fitting items claim first
            s1, s2, s3 = (int(v) for v in raw[i])
            if (s1 * k2 + s2) * k3 + s3 not in taken:
                taken.add((s1 * k2 + s2) * k3 + s3)
                continue
            moved += 1
            code = self._nearest_free(x[i], s1, s2, taken)
            taken.add((code[0] * k2 + code[1]) * k3 + code[2])
            new_codes[i] = code
        self.item_ids = np.concatenate([self.item_ids, ids])
        self.codes = np.concatenate([self.codes, new_codes]).astype(np.int64)
        self._rebuild_index()
        return moved

    def _nearest_free(self, x: torch.Tensor, s1: int, s2: int, taken: set) -> tuple[int, int, int]:
        k1, k2, k3 = self.codebook_sizes
        c1, c2, c3 = self.centroids
        order1 = [s1] + [int(a) for a in _sq_dist(x[None], c1)[0].argsort() if int(a) != s1]
        for a in order1:
            res1 = x - c1[a]
            order2 = [s2] if a == s1 else []
            order2 += [int(b) for b in _sq_dist(res1[None], c2)[0].argsort() if int(b) not in order2]
            for b in order2:
                res2 = res1 - c2[b]
                for c in _sq_dist(res2[None], c3)[0].argsort().tolist():
                    if (a * k2 + b) * k3 + c not in taken:
                        return a, b, c
        raise ValueError("item_ids: the code space is full")

    # ------------------------------------------------------------------ lookups
    def _rebuild_index(self) -> None:
        order = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids = self.item_ids[order]
        self._sorted_codes = self.codes[order]
        if len(self.codebook_sizes) == 3:
            _, k2, k3 = self.codebook_sizes
            keys = (self.codes[:, 0] * k2 + self.codes[:, 1]) * k3 + self.codes[:, 2]
            korder = np.argsort(keys)
            self._sorted_keys, self._key_items = keys[korder], self.item_ids[korder]
        self._trie = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def lookup(self, item_ids) -> tuple[np.ndarray, np.ndarray]:
        """(N,) ids -> (codes (N, 3) int64 with zeros for unknown items, known (N,) bool)."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if not len(self._sorted_ids):
            return np.zeros((len(ids), 3), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        known = self._sorted_ids[pos] == ids
        codes = np.where(known[:, None], self._sorted_codes[pos], 0)
        return codes.astype(np.int64), known

    def codes_for(self, item_ids) -> np.ndarray:
        """(N,) ids -> (N, 3) int64; an unknown id raises ValueError (call add_items first)."""
        codes, known = self.lookup(item_ids)
        if not known.all():
            bad = np.asarray(item_ids, dtype=np.int64).reshape(-1)[~known][:5].tolist()
            raise ValueError(f"item_ids: unknown to the tokenizer (add_items first): {bad}")
        return codes

    def item_for_code(self, codes) -> np.ndarray:
        """(N, 3) codes -> (N,) item ids, -1 where no item has that id."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, 3)
        if not len(self.item_ids):
            return np.full(len(codes), -1, dtype=np.int64)
        _, k2, k3 = self.codebook_sizes
        keys = (codes[:, 0] * k2 + codes[:, 1]) * k3 + codes[:, 2]
        pos = np.searchsorted(self._sorted_keys, keys).clip(max=len(self._sorted_keys) - 1)
        hit = (self._sorted_keys[pos] == keys) & (codes >= 0).all(1)
        return np.where(hit, self._key_items[pos], -1)

    def trie(self) -> SemanticIdTrie:
        if self._trie is None:
            self._trie = SemanticIdTrie(self.codes, self.codebook_sizes, self.item_ids)
        return self._trie

    # ------------------------------------------------------------------ persistence
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"centroids_{i}": c.contiguous() for i, c in enumerate(self.centroids)}
        out["item_ids"] = torch.from_numpy(self.item_ids.copy())
        out["codes"] = torch.from_numpy(self.codes.copy())
        out["codebook_sizes"] = torch.tensor(self.codebook_sizes, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SemanticTokenizer":
        for name in ("centroids_0", "centroids_1", "centroids_2", "item_ids", "codes", "codebook_sizes"):
            if name not in tensors:
                raise ValueError(f"tokenizer tensors: missing {name!r}")
        tok = cls()
        tok.codebook_sizes = tuple(int(v) for v in tensors["codebook_sizes"].tolist())
        tok.centroids = [tensors[f"centroids_{i}"].float() for i in range(3)]
        tok.item_ids = tensors["item_ids"].numpy().astype(np.int64)
        tok.codes = tensors["codes"].numpy().astype(np.int64).reshape(-1, 3)
        if len(tok.item_ids) != len(tok.codes):
            raise ValueError("tokenizer tensors: item_ids and codes differ in length")
        tok._rebuild_index()
        return tok

    def save(self, path_or_fileobj: str | os.PathLike | BinaryIO) -> None:
        data = st_save(self.to_tensors(), metadata={"format": "onerec-semantic-tokenizer",
                                                    "codebook_sizes": json.dumps(list(self.codebook_sizes))})
        if hasattr(path_or_fileobj, "write"):
            path_or_fileobj.write(data)
        else:
            with open(path_or_fileobj, "wb") as f:
                f.write(data)

    @classmethod
    def load(cls, path_or_fileobj: str | os.PathLike | BinaryIO | bytes) -> "SemanticTokenizer":
        if isinstance(path_or_fileobj, bytes):
            data = path_or_fileobj
        elif hasattr(path_or_fileobj, "read"):
            data = path_or_fileobj.read()
        else:
            with open(path_or_fileobj, "rb") as f:
                data = f.read()
        return cls.from_tensors(st_load(data))

    # ------------------------------------------------------------------ checks
    def _check_items(self, item_ids, embeddings, *, fitting: bool) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(item_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"item_ids: expected a 1-D int array, got {ids.dtype} {ids.shape}")
        if len(ids) == 0:
            raise ValueError("item_ids: empty")
        if (ids < 0).any():
            raise ValueError("item_ids: must be >= 0")
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"embeddings: expected shape ({len(ids)}, D), got {emb.shape}")
        if not fitting and emb.shape[1] != self.centroids[0].shape[1]:
            raise ValueError(f"embeddings: expected dim {self.centroids[0].shape[1]}, got {emb.shape[1]}")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings: non-finite values")
        return ids.astype(np.int64), np.ascontiguousarray(emb)


def tokenizer_bytes(tok: SemanticTokenizer) -> bytes:
    buf = io.BytesIO()
    tok.save(buf)
    return buf.getvalue()
