"""The World's immediate response model: what a KuaiRand user does with one shown video, given their taste.

Invariant: on the (user, video) pairs of the rows it was fitted on, the sampled play time follows the
log's law of play time per duration bucket (SimulatorConfig's tolerances, checked by simulator/check.py);
a user's taste only moves a response along that law. Scoring never changes any state.

What the model is (one multi-task factorization, fitted by simulator/response_fit.py):

    s_h(u, i) = g_h + a_{u,h} + b_{i,h} + sum_d p_{u,d} q_{i,d} r_{h,d}         heads h in HEADS
    q_i       = q_free_i + W e_i        (e_i: the catalogue's item embedding, so unseen videos get a taste
                                          vector from their content and co-watch neighbours)

- `p_u` is the user's taste (fitted on their own log rows and their pre-week watch / like / long-watch
  history); `a_u`, `b_i` are the user's and the video's own appeal per head; `r_h` lets the heads share
  the taste space with their own weights. A user or video without data gets zeros: the population prior.
- play time (Gaussian copula per duration bucket, the law of simulator/users.py with a fitted score):
      n = s_play + sigma * eps,  eps ~ N(0, 1);   u = F_b(n);   play_time = duration * Q_b(u)
  F_b is the distribution of n over the fit rows of bucket b (stored as quantiles), Q_b the log's
  quantile function of play / duration in bucket b, so the marginal law per bucket is the log's.
  Expected play time and P(long view) are integrals over eps (Gauss-Hermite quadrature; exact threshold).
- like, follow, comment, forward, dislike: Bernoulli(sigmoid(s_h)), independent given the scores.
- a video the user already watched recently plays `repeat_shift` lower on the play score (fitted: the
  mean residual of re-watched rows in the log).

Why this model: it is the smallest one that separates the three things the issue asks for (taste,
a video's own appeal, its duration), it is fitted in seconds on the week, it has a closed-form expected
play time for the oracle, and the copula keeps the play-time law the rest of the project was built on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from learner.flags import LONG_VIEW_S
from onerec_data import data_path
from simulator.users import normal_cdf

HEADS = ("play", "long_view", "like", "follow", "comment", "forward", "dislike")
FLAG_HEADS = ("like", "follow", "comment", "forward", "dislike")
LICENCE = "derived from KuaiRand (Gao et al., CIKM 2022), CC BY-SA 4.0"
_DEFAULT_PATH = data_path("simulator", "kuairand_world.safetensors")   # package data: shipped in the wheel
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(24)   # nodes for E over a standard normal
_GH_W = _GH_W / _GH_W.sum()


def default_world_path() -> Path:
    return _DEFAULT_PATH


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))


def normal_sf(x: np.ndarray) -> np.ndarray:
    """P(N(0,1) > x), vectorized (the table lookup of simulator/users.py, error < 1e-6)."""
    return normal_cdf(-np.asarray(x, dtype=np.float64))


@dataclass
class ResponseModel:
    """The fitted arrays; `save`/`load` as one safetensors file with JSON metadata."""

    user_ids: np.ndarray          # (U,) int64
    user_vec: np.ndarray          # (U, D) taste p_u
    user_bias: np.ndarray         # (U, H) a_u
    item_ids: np.ndarray          # (N,) int64, the catalogue
    item_vec: np.ndarray          # (N, D) q_i (content projection included)
    item_bias: np.ndarray         # (N, H) b_i
    item_duration_s: np.ndarray   # (N,)
    item_embedding: np.ndarray    # (N, E) unit rows: the catalogue embedding (repetition distance)
    item_fit_play_s: np.ndarray   # (N,) total play time in the fit days (popular policy, cold-start)
    head_bias: np.ndarray         # (H,) g_h
    head_weight: np.ndarray       # (H, D) r_h
    bucket_edges_s: np.ndarray    # (B+1,) last = inf
    levels: np.ndarray            # (Q,) quantile levels in [0, 1]
    ratio_quantiles: np.ndarray   # (B, Q) Q_b: play / duration
    score_quantiles: np.ndarray   # (B, Q) F_b^-1: the latent n over the fit rows
    scalars: dict                 # sigma, repeat_shift, crowd_distance, fit report, ...

    _ARRAYS = ("user_ids", "user_vec", "user_bias", "item_ids", "item_vec", "item_bias", "item_duration_s",
               "item_embedding", "item_fit_play_s", "head_bias", "head_weight", "bucket_edges_s", "levels",
               "ratio_quantiles", "score_quantiles")
    _HALF = ("user_vec", "item_embedding")   # stored float16 (keeps the artifact to a few MB)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self._ARRAYS:
            arr = np.asarray(getattr(self, name))
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float16 if name in self._HALF else np.float32)
                if name == "bucket_edges_s":
                    arr = arr.astype(np.float64)
            tensors[name] = np.ascontiguousarray(arr)
        meta = {"scalars": json.dumps(self.scalars), "heads": json.dumps(HEADS), "licence": LICENCE}
        save_file(tensors, str(path), metadata=meta)
        path.with_suffix(".json").write_text(json.dumps({"heads": HEADS, "licence": LICENCE,
                                                         **self.scalars}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ResponseModel":
        path = Path(path) if path else _DEFAULT_PATH
        if not path.exists():
            raise FileNotFoundError(f"world artifact not found: {path} (run `onerec simulator fit`)")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if "scalars" not in meta or json.loads(meta.get("heads", "[]")) != list(HEADS):
            raise ValueError(f"{path}: not a world artifact (metadata heads {meta.get('heads')} != {list(HEADS)})")
        arrays = load_file(str(path))
        missing = [n for n in cls._ARRAYS if n not in arrays]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        fields = {n: (arrays[n].astype(np.float64) if arrays[n].dtype.kind == "f" else arrays[n])
                  for n in cls._ARRAYS}
        return cls(**fields, scalars=json.loads(meta["scalars"]))

    # ---- scoring (pure functions of the arrays and the given user state) --------------------------
    @property
    def sigma(self) -> float:
        return float(self.scalars["sigma"])

    def bucket_of(self, duration_s: np.ndarray) -> np.ndarray:
        edges = self.bucket_edges_s
        return np.clip(np.searchsorted(edges, duration_s, side="right") - 1, 0, len(edges) - 2)

    def head_scores(self, user_vec: np.ndarray, user_bias: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(M, H) scores s_h for one user state (user_vec (D,), user_bias (H,)) and item rows (M,)."""
        inter = (self.item_vec[rows] * user_vec[None, :]) @ self.head_weight.T      # (M, H)
        return self.head_bias[None, :] + user_bias[None, :] + self.item_bias[rows] + inter

    def uniform_of(self, n: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """u = F_b(n) per element; n (M, ...) and buckets (M,)."""
        out = np.empty_like(n, dtype=np.float64)
        for b in np.unique(buckets):
            m = buckets == b
            out[m] = np.interp(n[m], self.score_quantiles[b], self.levels)
        return out

    def ratio_of(self, u: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """play / duration = Q_b(u) per element; u (M, ...) and buckets (M,)."""
        out = np.empty_like(u, dtype=np.float64)
        for b in np.unique(buckets):
            m = buckets == b
            out[m] = np.interp(u[m], self.levels, self.ratio_quantiles[b])
        return out

    def play_scores(self, user_vec: np.ndarray, user_bias: np.ndarray) -> np.ndarray:
        """(N,) play-head score of every catalogue video for one user state (one mat-vec)."""
        return (self.head_bias[0] + user_bias[0] + self.item_bias[:, 0]
                + self.item_vec @ (user_vec * self.head_weight[0]))

    def expected_play_s(self, s_play: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """E[play time] (M,) over the copula noise: duration * E_b(s), E_b tabulated per bucket."""
        grid, table = self._expected_ratio_table()
        buckets = self.bucket_of(self.item_duration_s[rows])
        out = np.empty(len(rows))
        for b in np.unique(buckets):
            m = buckets == b
            out[m] = np.interp(s_play[m], grid, table[b])
        return self.item_duration_s[rows] * out

    def expected_ratio_exact(self, s_play: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """E[play / duration] (M,) by Gauss-Hermite quadrature (the reference the table is built from)."""
        n = s_play[:, None] + self.sigma * _GH_X[None, :]                            # (M, G)
        return self.ratio_of(self.uniform_of(n, buckets), buckets) @ _GH_W

    def _expected_ratio_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(grid (S,), E_b(grid) (B, S)): the expected ratio is a smooth increasing function of s."""
        cached = getattr(self, "_ratio_table", None)
        if cached is None:
            lo, hi = float(self.score_quantiles.min()) - 4 * self.sigma, float(self.score_quantiles.max()) + 4 * self.sigma
            grid = np.linspace(lo, hi, 801)
            n_b = self.ratio_quantiles.shape[0]
            table = np.stack([self.expected_ratio_exact(grid, np.full(len(grid), b)) for b in range(n_b)])
            cached = self._ratio_table = (grid, table)
        return cached

    def p_long_view(self, s_play: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """P(play >= min(18 s, 0.9 duration)) (M,): KuaiRand's long view under the play law."""
        d = self.item_duration_s[rows]
        buckets = self.bucket_of(d)
        need = np.minimum(LONG_VIEW_S, 0.9 * d) / d                                   # ratio threshold
        u_star = np.empty_like(need)
        n_star = np.empty_like(need)
        for b in np.unique(buckets):
            m = buckets == b
            rq = self.ratio_quantiles[b]
            # the smallest level whose ratio reaches the threshold (the upper end of an atom)
            u_star[m] = np.interp(need[m], rq + np.arange(len(rq)) * 1e-12, self.levels)
            n_star[m] = np.interp(u_star[m], self.levels, self.score_quantiles[b])
        return normal_sf((n_star - s_play) / self.sigma)

    def sample(self, scores: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Draw responses for (M,) items from their (M, H) scores: play_time_s and the flag booleans."""
        buckets = self.bucket_of(self.item_duration_s[rows])
        n = scores[:, 0] + self.sigma * rng.standard_normal(len(rows))
        play = self.item_duration_s[rows] * self.ratio_of(self.uniform_of(n, buckets), buckets)
        out = {"play_time_s": play}
        draws = rng.random((len(rows), len(FLAG_HEADS)))
        for f, name in enumerate(FLAG_HEADS):
            out[name] = draws[:, f] < sigmoid(scores[:, HEADS.index(name)])
        return out
