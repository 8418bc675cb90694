"""Simulated KuaiRand users: given a user and a recommended video, sample play time, like and dislike.

Invariant: with relevance at its log average the simulator reproduces the log's play-time law per
duration bucket and its like/dislike rates (tolerances in SimulatorConfig, checked by `onerec simulator`
and tests/test_simulator.py); relevance only moves a response along that law, never off it.

The model is a Gaussian copula per duration bucket:

    n   = b_user + c * z_rel + sigma * eps,      eps ~ N(0, 1)
    u   = Phi(n / sqrt(var_b + c^2 + sigma^2))   # uniform on [0, 1] over the log's users and items
    play_time = duration * Q_bucket(u)           # Q = the log's quantile function of play/duration
    P(like | bucket, u), P(dislike | u), ...     # the log's rates per bin of u

`z_rel` is the standardized cosine between the video's embedding and the mean embedding of the user's
`relevance_window` most recent videos, so videos close to a user's history get longer play (and, through
u, more likes and fewer dislikes). `b_user` is the user's shrunk mean normal score in the log.
All of it is numpy; `respond` costs tens of microseconds.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from simulator import kuairand
from learner.flags import flags_of
from onerec_data import data_path
from simulator.config import SimulatorConfig

FLAG_NAMES = ("like", "follow", "comment", "forward", "dislike")
# interface flag bits (docs/interfaces.md): 1 like, 2 follow, 4 comment, 8 forward, 16 collect, 32 dislike, 64 long view
LICENCE = "derived from KuaiRand (Gao et al., CIKM 2022), CC BY-SA 4.0"

_DEFAULT_PARAMS = data_path("simulator", "kuairand_simulator.safetensors")   # package data (data/simulator/)
_PHI_GRID = np.linspace(-8.0, 8.0, 4001)
_PHI_TABLE = np.array([0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) for x in _PHI_GRID])


def default_params_path() -> Path:
    return _DEFAULT_PARAMS


def normal_cdf(x: np.ndarray | float) -> np.ndarray:
    """Phi by table lookup (error < 1e-6): keeps the hot path numpy-only."""
    return np.interp(x, _PHI_GRID, _PHI_TABLE)


def flags_of_response(response: dict, duration_s: float) -> int:
    """The interface bitmask of one response (what `observe` and a user context store)."""
    return flags_of(response, duration_s)


@dataclass
class SimulatorParams:
    """Everything fitted from the log; saved as one safetensors file (arrays + JSON metadata)."""

    bucket_edges_s: np.ndarray     # (B+1,) duration bucket edges in seconds, last = inf
    quantile_levels: np.ndarray    # (Q,) in [0, 1]
    ratio_quantiles: np.ndarray    # (B, Q) play/duration quantile function per bucket
    u_bin_edges: np.ndarray        # (K+1,) bins of the latent uniform u for the flag tables
    flag_probs: np.ndarray         # (F, B, K) P(flag | bucket, u-bin), F in FLAG_NAMES order
    relevance_mean: np.ndarray     # (B,) mean relevance of the log's rows per duration bucket
    relevance_std: np.ndarray      # (B,)
    user_ids: np.ndarray           # (U,) int64
    user_offset: np.ndarray        # (U,) b_user
    item_ids: np.ndarray           # (N,) int64, the catalogue
    item_durations_s: np.ndarray   # (N,)
    item_embeddings: np.ndarray    # (N, D) unit rows (stored float16)
    scalars: dict                  # relevance_coef, noise_var, user_var, log rates, ...

    _ARRAYS = ("bucket_edges_s", "quantile_levels", "ratio_quantiles", "u_bin_edges", "flag_probs",
               "relevance_mean", "relevance_std",
               "user_ids", "user_offset", "item_ids", "item_durations_s", "item_embeddings")

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self._ARRAYS:
            arr = getattr(self, name)
            if name == "item_embeddings":
                arr = arr.astype(np.float16)
            elif arr.dtype.kind == "f" and name not in ("bucket_edges_s",):
                arr = arr.astype(np.float32)
            tensors[name] = np.ascontiguousarray(arr)
        save_file(tensors, str(path), metadata={"scalars": json.dumps(self.scalars),
                                                "flag_names": json.dumps(FLAG_NAMES),
                                                "licence": LICENCE})

    @classmethod
    def load(cls, path: str | Path) -> "SimulatorParams":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"simulator parameters not found: {path} (run `onerec simulator` to fit them)")
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if "scalars" not in meta:
            raise ValueError(f"{path}: not a simulator parameter file (no 'scalars' metadata)")
        if json.loads(meta.get("flag_names", "[]")) != list(FLAG_NAMES):
            raise ValueError(f"{path}: flag_names {meta.get('flag_names')} != {list(FLAG_NAMES)}")
        arrays = load_file(str(path))
        missing = [n for n in cls._ARRAYS if n not in arrays]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        fields = {n: arrays[n] for n in cls._ARRAYS}
        fields["item_embeddings"] = fields["item_embeddings"].astype(np.float32)
        fields["ratio_quantiles"] = fields["ratio_quantiles"].astype(np.float64)
        fields["flag_probs"] = fields["flag_probs"].astype(np.float64)
        return cls(**fields, scalars=json.loads(meta["scalars"]))


class UserSimulator:
    """KuaiRand users who watch, like and dislike what they are shown; `observe` feeds their history."""

    def __init__(self, params: SimulatorParams, cfg: SimulatorConfig | None = None):
        self.cfg = cfg or SimulatorConfig()
        self.params = params
        self.rng = np.random.default_rng(self.cfg.seed)
        p = params
        self.user_ids = p.user_ids.astype(np.int64)
        self.item_ids = p.item_ids.astype(np.int64)
        self.durations_s = p.item_durations_s.astype(np.float64)
        self._user_row = {int(u): i for i, u in enumerate(self.user_ids)}
        self._item_row = {int(v): i for i, v in enumerate(self.item_ids)}
        self._emb = p.item_embeddings.astype(np.float32)  # (N, D) unit rows
        s = p.scalars
        fitted_coef = float(s["relevance_coef"])
        self.relevance_coef = fitted_coef if self.cfg.relevance_strength < 0 else float(self.cfg.relevance_strength)
        # keep the latent's variance at the fitted total so the marginal law stays the log's
        fitted_total = float(s["user_var"]) + float(s["relevance_coef"]) ** 2 + float(s["noise_var"])
        self.noise_var = max(fitted_total - float(s["user_var"]) - self.relevance_coef ** 2, 0.05 * fitted_total)
        self._latent_scale = 1.0 / math.sqrt(float(s["user_var"]) + self.relevance_coef ** 2 + self.noise_var)
        # scalar copies for the per-call path of `respond`
        self._item_bucket = np.clip(np.searchsorted(p.bucket_edges_s, self.durations_s, side="right") - 1, 0,
                                    p.ratio_quantiles.shape[0] - 1)
        self._rel_mean, self._rel_std = p.relevance_mean.tolist(), p.relevance_std.tolist()
        self._user_offset = p.user_offset.astype(np.float64).tolist()
        self._noise_sd = math.sqrt(self.noise_var)
        self._u_edges = p.u_bin_edges.tolist()
        self._recent: dict[int, deque] = {}
        self._recent_mean: dict[int, np.ndarray | None] = {}
        self._history = kuairand.UserHistory(short_len=self.cfg.short_len, long_len=self.cfg.long_len, warm_start=True)

    @classmethod
    def default(cls, seed: int = 0, cfg: SimulatorConfig | None = None) -> "UserSimulator":
        """The simulator fitted on the shipped KuaiRand week (data/simulator/), no refitting."""
        cfg = cfg or SimulatorConfig(seed=seed)
        if cfg.seed != seed:
            cfg = SimulatorConfig(**{**cfg.__dict__, "seed": seed})
        path = Path(cfg.params_path) if cfg.params_path else _DEFAULT_PARAMS
        return cls(SimulatorParams.load(path), cfg)

    # ---- lookups -------------------------------------------------------------------------------
    def _user_index(self, user_id: int) -> int:
        row = self._user_row.get(int(user_id))
        if row is None:
            raise ValueError(f"user_id {user_id} is not a simulated user")
        return row

    def _item_index(self, item_id: int) -> int:
        row = self._item_row.get(int(item_id))
        if row is None:
            raise ValueError(f"item_id {item_id} is not in the simulator's catalogue")
        return row

    def duration_of(self, item_id: int) -> float:
        return float(self.durations_s[self._item_index(item_id)])

    def _recent_items(self, user_id: int) -> deque:
        recent = self._recent.get(user_id)
        if recent is None:
            warm = kuairand.read_user_history().get(user_id, {}).get("watch_seq", [])
            recent = deque((v for v in warm if int(v) in self._item_row), maxlen=self.cfg.relevance_window)
            self._recent[user_id] = recent
        return recent

    def _history_mean(self, user_id: int) -> np.ndarray | None:
        """Unit mean embedding of the user's recent videos (None when the user has watched nothing)."""
        if user_id in self._recent_mean:
            return self._recent_mean[user_id]
        recent = self._recent_items(user_id)
        mean = None
        if recent:
            rows = [self._item_row[int(v)] for v in recent]
            m = self._emb[rows].mean(axis=0)
            norm = float(np.linalg.norm(m))
            mean = m / norm if norm > 0 else None
        self._recent_mean[user_id] = mean
        return mean

    def relevance(self, user_id: int, item_id: int) -> float:
        """Cosine between the video and the user's recent history (NaN when the user has none)."""
        self._user_index(user_id)
        mean = self._history_mean(int(user_id))
        if mean is None:
            return math.nan
        return float(self._emb[self._item_index(item_id)] @ mean)

    # ---- the API the loop uses -----------------------------------------------------------------
    def context(self, user_id: int) -> dict:
        """The user-context dict of docs/interfaces.md, warm-started from KuaiRand and updated by observe."""
        self._user_index(user_id)
        return self._history.context(int(user_id))

    def respond(self, user_id: int, item_id: int) -> dict:
        """Sample the user's reaction to being shown the video (does not change the user's state).

        A scalar path of `respond_batch` (same draws in the same order, so the same seed gives the
        same answer either way): the loop calls this once per shown item.
        """
        p = self.params
        u_row, i_row = self._user_index(user_id), self._item_index(item_id)
        rel = self.relevance(user_id, item_id)
        bucket = int(self._item_bucket[i_row])
        z = 0.0 if math.isnan(rel) else (rel - self._rel_mean[bucket]) / self._rel_std[bucket]
        latent = self._user_offset[u_row] + self.relevance_coef * z + self._noise_sd * self.rng.standard_normal()
        u = 0.5 * (1.0 + math.erf(latent * self._latent_scale / math.sqrt(2.0)))
        ratio = float(np.interp(u, p.quantile_levels, p.ratio_quantiles[bucket]))
        u_bin = min(max(bisect.bisect_right(self._u_edges, u) - 1, 0), p.flag_probs.shape[2] - 1)
        draws = self.rng.random(len(FLAG_NAMES))
        out = {"play_time_s": ratio * float(self.durations_s[i_row])}
        for f, name in enumerate(FLAG_NAMES):
            out[name] = bool(draws[f] < p.flag_probs[f, bucket, u_bin])
        out["collect"] = False
        return out

    def respond_batch(self, user_ids: np.ndarray, item_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorized respond over pairs (N,): play_time_s float64, flags bool arrays."""
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if user_ids.shape != item_ids.shape:
            raise ValueError(f"user_ids {user_ids.shape} and item_ids {item_ids.shape} must have the same length")
        rel = np.fromiter((self.relevance(u, v) for u, v in zip(user_ids, item_ids)), dtype=np.float64,
                          count=len(user_ids))
        return self.respond_with_relevance(user_ids, item_ids, rel)

    def respond_with_relevance(self, user_ids: np.ndarray, item_ids: np.ndarray,
                               relevance: np.ndarray) -> dict[str, np.ndarray]:
        """respond_batch with the relevance (N,) given (NaN = no history); the log check replays the
        log's own history this way (simulator.fit.log_relevance) instead of the simulator's state."""
        p = self.params
        u_rows = np.fromiter((self._user_index(u) for u in user_ids), dtype=np.int64, count=len(user_ids))
        i_rows = np.fromiter((self._item_index(v) for v in item_ids), dtype=np.int64, count=len(item_ids))
        rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
        duration = self.durations_s[i_rows]
        bucket = self._item_bucket[i_rows]
        z = np.nan_to_num((rel - p.relevance_mean[bucket]) / p.relevance_std[bucket], nan=0.0)
        latent = p.user_offset[u_rows] + self.relevance_coef * z + self._noise_sd * self.rng.standard_normal(len(z))
        u = normal_cdf(latent * self._latent_scale)                          # (N,)
        ratio = _interp_rows(u, p.quantile_levels, p.ratio_quantiles[bucket])
        play = ratio * duration
        u_bin = np.clip(np.searchsorted(p.u_bin_edges, u, side="right") - 1, 0, p.flag_probs.shape[2] - 1)
        out: dict[str, np.ndarray] = {"play_time_s": play}
        for f, name in enumerate(FLAG_NAMES):
            out[name] = self.rng.random(len(u)) < p.flag_probs[f, bucket, u_bin]
        out["collect"] = np.zeros(len(u), dtype=bool)  # KuaiRand logs no collects
        return out

    def observe(self, user_id: int, item_id: int, duration_s: float, play_time_s: float, flags: int) -> None:
        """The user watched the video: it enters their history (context and relevance)."""
        user_id, item_id = int(user_id), int(item_id)
        self._user_index(user_id)
        self._item_index(item_id)
        self._history.record(user_id, item_id, float(duration_s), float(play_time_s), int(flags))
        self._recent_items(user_id).append(item_id)
        self._recent_mean.pop(user_id, None)


def _interp_rows(u: np.ndarray, levels: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Row-wise np.interp: tables (N, Q) at u (N,) on the shared grid `levels` (Q,)."""
    q = len(levels)
    hi = np.clip(np.searchsorted(levels, u, side="right"), 1, q - 1)
    lo = hi - 1
    w = (u - levels[lo]) / (levels[hi] - levels[lo])
    rows = np.arange(len(u))
    return tables[rows, lo] * (1.0 - w) + tables[rows, hi] * w
