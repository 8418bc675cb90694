"""User context dicts (interfaces.md "User context") -> padded tensors the context processor reads.

Invariant: everything that reaches the model went through `build_context_batch` or
`ContextBatch.check`, so a bad context fails here with a ValueError naming the field
(`contexts[3].short.flags[7]`), never by silent broadcasting inside the model.

Layout of one row: [short items (S), long items (L)] left-aligned with padding after each segment's
real items; `segment` says which is which and `mask` which positions are real. Profile tokens are
separate (`profile (B, P)`); the context processor puts them first.
"""
from __future__ import annotations

import math
from itertools import chain
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from learner.config import N_FLAG_VALUES, ModelConfig

if TYPE_CHECKING:
    from learner.tokenizer import SemanticTokenizer

SEQUENCE_KEYS = ("item_id", "duration_s", "play_time_s", "flags")


@dataclass
class ContextBatch:
    profile: torch.Tensor          # (B, P) long
    item_hash: torch.Tensor        # (B, T) long, item_id % item_hash_buckets
    semantic_ids: torch.Tensor     # (B, T, 3) long, codebook_size = "item unknown to the tokenizer"
    duration_bucket: torch.Tensor  # (B, T) long
    play_bucket: torch.Tensor      # (B, T) long
    flags: torch.Tensor            # (B, T) long, 7-bit action mask
    segment: torch.Tensor          # (B, T) long, 0 short, 1 long
    mask: torch.Tensor             # (B, T) bool, True = real token

    def __len__(self) -> int:
        return int(self.profile.shape[0])

    @property
    def n_tokens(self) -> int:
        """Context length N the decoder attends over: profile tokens + item slots."""
        return int(self.profile.shape[1] + self.mask.shape[1])

    def to(self, device: torch.device | str) -> "ContextBatch":
        return ContextBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index_select(self, rows: torch.Tensor | Sequence[int]) -> "ContextBatch":
        """Rows of the batch, in the given order (repeats allowed)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.profile.device)
        return ContextBatch(**{f.name: getattr(self, f.name).index_select(0, rows) for f in fields(self)})

    def check(self, cfg: ModelConfig) -> None:
        """Shapes, dtypes and id ranges against cfg; ValueError naming the field."""
        b = self.profile.shape[0] if self.profile.dim() == 2 else -1
        if self.profile.dim() != 2 or self.profile.shape[1] != cfg.profile_fields:
            raise ValueError(f"profile: expected shape (B, {cfg.profile_fields}), got {tuple(self.profile.shape)}")
        t = self.mask.shape[1] if self.mask.dim() == 2 else -1
        if self.mask.dim() != 2 or self.mask.shape[0] != b or self.mask.dtype != torch.bool:
            raise ValueError(f"mask: expected bool (B={b}, T), got {self.mask.dtype} {tuple(self.mask.shape)}")
        for name in ("item_hash", "duration_bucket", "play_bucket", "flags", "segment"):
            x = getattr(self, name)
            if tuple(x.shape) != (b, t):
                raise ValueError(f"{name}: expected shape {(b, t)}, got {tuple(x.shape)}")
        if tuple(self.semantic_ids.shape) != (b, t, 3):
            raise ValueError(f"semantic_ids: expected shape {(b, t, 3)}, got {tuple(self.semantic_ids.shape)}")
        for name, high in (("profile", cfg.profile_vocab), ("item_hash", cfg.item_hash_buckets),
                           ("semantic_ids", cfg.codebook_size + 1), ("duration_bucket", cfg.n_duration_buckets),
                           ("play_bucket", cfg.n_play_buckets), ("flags", N_FLAG_VALUES), ("segment", 2)):
            x = getattr(self, name)
            if x.dtype != torch.long:
                raise ValueError(f"{name}: expected int64, got {x.dtype}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
                raise ValueError(f"{name}: values must be in [0, {high}), got [{int(x.min())}, {int(x.max())}]")
        if b == 0:
            raise ValueError("contexts: empty batch")
        if cfg.profile_fields == 0 and not bool(self.mask.any(dim=1).all()):
            raise ValueError("context: empty (no profile fields and no behaviour items)")


def duration_bucket(seconds: np.ndarray, n_buckets: int) -> np.ndarray:
    """Half-octave buckets of a duration in seconds: floor(2 log2(1 + s)), clipped to the last bucket."""
    return np.minimum(np.floor(2.0 * np.log2(1.0 + seconds)), n_buckets - 1).astype(np.int64)


def build_context_batch(contexts: list[dict], tokenizer: "SemanticTokenizer", cfg: ModelConfig) -> ContextBatch:
    """Validate, truncate to the newest `cfg.max_short` / `cfg.max_long` items, look up semantic ids, pad.

    Items the tokenizer does not know get the semantic id `codebook_size` (an "unknown" row) at every
    level; their hashed id embedding still carries them.

    The columns are built by array operations over the whole batch (`_columns_vectorized`: no Python
    loop per item); a batch that fails any of its checks is handed to the per-sample reference
    (`_columns_reference`), which raises the ValueError naming the field (or, when only a dropped old
    item was bad, builds the same columns).
    """
    if not isinstance(contexts, (list, tuple)) or not contexts:
        raise ValueError("contexts: expected a non-empty list of user-context dicts")
    columns = _columns_vectorized(contexts, cfg)
    if columns is None:
        columns = _columns_reference(contexts, cfg)
    return _assemble(columns, tokenizer, cfg)


def build_context_batch_reference(contexts: list[dict], tokenizer: "SemanticTokenizer",
                                  cfg: ModelConfig) -> ContextBatch:
    """The per-sample definition of `build_context_batch` (tests check the two are equal)."""
    if not isinstance(contexts, (list, tuple)) or not contexts:
        raise ValueError("contexts: expected a non-empty list of user-context dicts")
    return _assemble(_columns_reference(contexts, cfg), tokenizer, cfg)


def _assemble(columns: tuple, tokenizer: "SemanticTokenizer", cfg: ModelConfig) -> ContextBatch:
    """(profile (B, P), cols {key: (B, T)}, segment (B, T), mask (B, T)) -> the tensors of a ContextBatch."""
    profile, cols, segment, mask = columns
    b, t = mask.shape
    if tokenizer.codebook_sizes and max(tokenizer.codebook_sizes) > cfg.codebook_size:
        raise ValueError(f"tokenizer: codebook sizes {tokenizer.codebook_sizes} exceed "
                         f"ModelConfig.codebook_size {cfg.codebook_size}")
    codes, known = tokenizer.lookup(cols["item_id"].reshape(-1))
    codes = np.where(known[:, None], codes, cfg.codebook_size).reshape(b, t, 3)
    codes[~mask] = 0
    batch = ContextBatch(
        profile=torch.from_numpy(profile),
        item_hash=torch.from_numpy(cols["item_id"] % cfg.item_hash_buckets),
        semantic_ids=torch.from_numpy(np.ascontiguousarray(codes)),
        duration_bucket=torch.from_numpy(duration_bucket(cols["duration_s"], cfg.n_duration_buckets) * mask),
        play_bucket=torch.from_numpy(duration_bucket(cols["play_time_s"], cfg.n_play_buckets) * mask),
        flags=torch.from_numpy(cols["flags"]),
        segment=torch.from_numpy(segment),
        mask=torch.from_numpy(mask),
    )
    if cfg.profile_fields == 0 and not mask.any(axis=1).all():
        row = int(np.flatnonzero(~mask.any(axis=1))[0])
        raise ValueError(f"contexts[{row}]: empty context (no profile fields and no behaviour items)")
    return batch


def _columns_reference(contexts: Sequence, cfg: ModelConfig) -> tuple:
    """Per sample: validate each context (errors name the field), then copy it into padded columns."""
    parsed = [_parse_context(c, f"contexts[{n}]", cfg) for n, c in enumerate(contexts)]
    b = len(parsed)
    s_len = max(len(p["short"]["item_id"]) for p in parsed)
    l_len = max(len(p["long"]["item_id"]) for p in parsed)
    t = s_len + l_len
    profile = np.zeros((b, cfg.profile_fields), dtype=np.int64)
    cols = {k: np.zeros((b, t), dtype=np.float64 if k.endswith("_s") else np.int64) for k in SEQUENCE_KEYS}
    segment = np.zeros((b, t), dtype=np.int64)
    segment[:, s_len:] = 1
    mask = np.zeros((b, t), dtype=bool)
    for row, p in enumerate(parsed):
        profile[row] = p["profile"]
        for start, part in ((0, p["short"]), (s_len, p["long"])):
            n = len(part["item_id"])
            for k in SEQUENCE_KEYS:
                cols[k][row, start:start + n] = part[k]
            mask[row, start:start + n] = True
    return profile, cols, segment, mask


def _columns_vectorized(contexts: Sequence, cfg: ModelConfig) -> tuple | None:
    """The columns of `_columns_reference` by whole-batch array operations, or None when any check
    fails (the reference then names the field). Per context only the dict and list look-ups run in
    Python; per item, C loops only (map, chain, numpy)."""
    try:
        if not all(type(c) is dict for c in contexts):
            return None
        profiles = [c["profile"] for c in contexts]
        segments = [_segment_vectorized([c[seg] for c in contexts], keep)
                    for seg, keep in (("short", cfg.max_short), ("long", cfg.max_long))]
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    b = len(contexts)
    if any(s is None for s in segments) or not all(type(p) in (list, tuple) for p in profiles):
        return None
    if not all(len(p) == cfg.profile_fields for p in profiles) or not _only_ints(chain.from_iterable(profiles)):
        return None
    try:
        profile = np.array(profiles, dtype=np.int64).reshape(b, cfg.profile_fields)
    except (ValueError, OverflowError):
        return None
    if profile.size and (profile.min() < 0 or profile.max() >= cfg.profile_vocab):
        return None
    (s_vals, s_rows, s_pos, s_kept), (l_vals, l_rows, l_pos, l_kept) = segments
    if cfg.profile_fields == 0 and not ((s_kept > 0) | (l_kept > 0)).all():
        return None
    s_len, l_len = int(s_kept.max()), int(l_kept.max())
    t = s_len + l_len
    cols = {k: np.zeros((b, t), dtype=np.float64 if k.endswith("_s") else np.int64) for k in SEQUENCE_KEYS}
    for k in SEQUENCE_KEYS:
        cols[k][s_rows, s_pos] = s_vals[k]
        cols[k][l_rows, s_len + l_pos] = l_vals[k]
    segment = np.zeros((b, t), dtype=np.int64)
    segment[:, s_len:] = 1
    mask = np.zeros((b, t), dtype=bool)
    mask[s_rows, s_pos] = True
    mask[l_rows, s_len + l_pos] = True
    return profile, cols, segment, mask


def _segment_vectorized(parts: list, keep: int) -> tuple | None:
    """One segment ("short" or "long") of every context -> (kept values {key: (M,)}, row (M,),
    position in the row (M,), kept length per context (B,)), the newest `keep` items; None when a
    check fails."""
    if not all(type(p) is dict for p in parts):
        return None
    lists = {k: [p[k] for p in parts] for k in SEQUENCE_KEYS}
    if not all(type(x) in (list, tuple) for xs in lists.values() for x in xs):
        return None
    lengths = np.fromiter(map(len, lists["item_id"]), dtype=np.int64, count=len(parts))
    for k in SEQUENCE_KEYS[1:]:
        if not np.array_equal(np.fromiter(map(len, lists[k]), dtype=np.int64, count=len(parts)), lengths):
            return None
    kept = np.minimum(lengths, keep)                                     # (B,)
    rows = np.repeat(np.arange(len(parts)), lengths)                     # (total,)
    ends = np.cumsum(lengths)
    pos = np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths) - np.repeat(lengths - kept, lengths)
    take = pos >= 0                                                      # the newest `keep` of each row
    values = {}
    for k in SEQUENCE_KEYS:
        flat = list(chain.from_iterable(lists[k]))
        if k in ("item_id", "flags"):
            if not _only_ints(flat):
                return None
            v = np.array(flat, dtype=np.int64)[take]
            if v.size and (v.min() < 0 or (k == "flags" and v.max() >= N_FLAG_VALUES)):
                return None
        else:
            if not all(issubclass(tp, (int, float)) and tp is not bool for tp in set(map(type, flat))):
                return None
            v = np.array(flat, dtype=np.float64)[take]
            if v.size and not (np.isfinite(v).all() and v.min() >= 0):
                return None
        values[k] = v
    return values, rows[take], pos[take], kept


def _only_ints(values) -> bool:
    """Every value an int (Python or numpy), none a bool: what `_is_int` accepts, checked per type."""
    return all(issubclass(tp, (int, np.integer)) and tp is not bool for tp in set(map(type, values)))


def _parse_context(ctx: Any, where: str, cfg: ModelConfig) -> dict:
    if not isinstance(ctx, dict):
        raise ValueError(f"{where}: expected a dict with profile, short, long; got {type(ctx).__name__}")
    for key in ("profile", "short", "long"):
        if key not in ctx:
            raise ValueError(f"{where}.{key}: missing")
    profile = ctx["profile"]
    if not isinstance(profile, (list, tuple)) or len(profile) != cfg.profile_fields:
        n = len(profile) if isinstance(profile, (list, tuple)) else type(profile).__name__
        raise ValueError(f"{where}.profile: expected {cfg.profile_fields} ints, got {n}")
    for i, v in enumerate(profile):
        if not _is_int(v) or not 0 <= v < cfg.profile_vocab:
            raise ValueError(f"{where}.profile[{i}]: expected an int in [0, {cfg.profile_vocab}), got {v!r}")
    out = {"profile": [int(v) for v in profile]}
    for seg, keep in (("short", cfg.max_short), ("long", cfg.max_long)):
        part = ctx[seg]
        if not isinstance(part, dict):
            raise ValueError(f"{where}.{seg}: expected a dict of parallel arrays")
        lengths = {}
        for k in SEQUENCE_KEYS:
            if k not in part:
                raise ValueError(f"{where}.{seg}.{k}: missing")
            if not isinstance(part[k], (list, tuple)):
                raise ValueError(f"{where}.{seg}.{k}: expected a list, got {type(part[k]).__name__}")
            lengths[k] = len(part[k])
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{where}.{seg}: arrays must have equal lengths, got {lengths}")
        seq = {k: list(part[k])[max(0, len(part[k]) - keep):] for k in SEQUENCE_KEYS}
        for k in SEQUENCE_KEYS:
            for i, v in enumerate(seq[k]):
                if k in ("item_id", "flags"):
                    high = N_FLAG_VALUES if k == "flags" else None
                    if not _is_int(v) or v < 0 or (high is not None and v >= high):
                        rng = f"[0, {high})" if high else ">= 0"
                        raise ValueError(f"{where}.{seg}.{k}[{i}]: expected an int {rng}, got {v!r}")
                elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"{where}.{seg}.{k}[{i}]: expected a finite number >= 0, got {v!r}")
        out[seg] = seq
    if cfg.profile_fields == 0 and not out["short"]["item_id"] and not out["long"]["item_id"]:
        raise ValueError(f"{where}: empty context (no profile fields and no behaviour items)")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
