"""Fit the World's response model (simulator/response.py) on the first days of a KuaiRand log.

Invariant: only the rows handed in (the fit days) and the pre-week warm-start histories are read; the
held-back day never reaches the fit, so simulator/check.py scores the world on data it has not seen.

Training rows, one per (user, video):
- every fit-day log row with a positive duration: all heads (the play head regresses the normal score of
  the row's play / duration rank within its duration bucket, MSE; the others are logistic);
- every video of a user's pre-week watch sequence: only `long_view` (in long_watch_seq) and `like`
  (in like_seq), the two signals that history carries.
Loss: sum over heads of the masked mean loss + an L2 penalty on the gathered rows; Adam, mini-batches.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from simulator import kuairand
from simulator.config import SimulatorConfig
from simulator.fit import QUANTILE_LEVELS, _randomized_ranks, catalogue
from simulator.response import HEADS, ResponseModel

_L2 = 3e-4              # per-row L2 on gathered parameters (validation sigma: 0.903 at 3e-4, 0.910 at 0.02)
_BATCH = 8192
_LR = 0.02
# The world's own duration buckets for the play law: finer than the check's (simulator/fit.py), because
# within a bucket the law of play / duration ignores the duration, and play time in seconds is checked.
BUCKET_EDGES_S = np.array([0.0, 7.0, 8.0, 11.0, 15.0, 22.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0,
                           400.0, np.inf])
_DEFAULT_REPEAT_SHIFT = 0.5   # used when the log holds too few re-watched rows to measure it


def bucket_of(duration_s: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(BUCKET_EDGES_S, duration_s, side="right") - 1, 0, len(BUCKET_EDGES_S) - 2)


def normal_scores(ratio: np.ndarray, buckets: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(z (R,), ratio quantile tables (B, Q)): each row's play/duration rank within its bucket as a normal
    score, ties spread uniformly; and Q_b, the bucket's quantile function of play / duration."""
    n_buckets = len(BUCKET_EDGES_S) - 1
    table = np.zeros((n_buckets, len(QUANTILE_LEVELS)))
    u = np.zeros(len(ratio))
    for b in range(n_buckets):
        m = buckets == b
        if m.sum() < 20:
            raise ValueError(f"duration bucket {b} ({BUCKET_EDGES_S[b]}-{BUCKET_EDGES_S[b + 1]} s) has "
                             f"{int(m.sum())} fit rows; need >= 20")
        table[b] = np.quantile(ratio[m], QUANTILE_LEVELS)
        u[m] = _randomized_ranks(ratio[m], rng)
    z = torch.special.ndtri(torch.from_numpy(np.clip(u, 1e-4, 1 - 1e-4))).numpy()
    return z, table


def _training_rows(log: kuairand.ImpressionLog, user_row: dict, item_row: dict, rng: np.random.Generator):
    """Arrays (user (R,), item (R,), targets (R, H), mask (R, H)) and the ratio quantile tables."""
    keep = (log.duration_ms > 0) & np.isin(log.video_id, list(item_row))
    dur = log.duration_ms[keep] / 1000.0
    z, ratio_table = normal_scores((log.play_time_ms[keep] / 1000.0) / dur, bucket_of(dur), rng)
    cols = {"play": z, "long_view": log.long_view[keep], "like": log.is_like[keep],
            "follow": log.is_follow[keep], "comment": log.is_comment[keep], "forward": log.is_forward[keep],
            "dislike": log.is_hate[keep]}
    log_t = np.stack([np.asarray(cols[h], dtype=np.float32) for h in HEADS], axis=1)
    log_u = np.array([user_row[int(u)] for u in log.user_id[keep]])
    log_i = np.array([item_row[int(v)] for v in log.video_id[keep]])

    hist_u, hist_i, hist_lv, hist_like = [], [], [], []
    for uid, h in kuairand.read_user_history().items():
        if uid not in user_row:
            continue
        lw, lk = set(h["long_watch_seq"]), set(h["like_seq"])
        for v in h["watch_seq"]:
            if v in item_row:
                hist_u.append(user_row[uid]); hist_i.append(item_row[v])
                hist_lv.append(v in lw); hist_like.append(v in lk)
    hist_t = np.zeros((len(hist_u), len(HEADS)), dtype=np.float32)
    hist_t[:, HEADS.index("long_view")] = hist_lv
    hist_t[:, HEADS.index("like")] = hist_like
    hist_m = np.zeros_like(hist_t, dtype=bool)
    hist_m[:, [HEADS.index("long_view"), HEADS.index("like")]] = True
    users = np.concatenate([log_u, np.asarray(hist_u, dtype=np.int64)])
    items = np.concatenate([log_i, np.asarray(hist_i, dtype=np.int64)])
    targets = np.concatenate([log_t, hist_t])
    mask = np.concatenate([np.ones_like(log_t, dtype=bool), hist_m])
    return users, items, targets, mask, ratio_table, (log_u, log_i, z)


class _Factorization(torch.nn.Module):
    """s_h = g_h + a_{u,h} + b_{i,h} + sum_d p_ud (q_id + (W e_i)_d) r_hd (see simulator/response.py)."""

    def __init__(self, n_users: int, n_items: int, item_emb: np.ndarray, dim: int, rates: np.ndarray):
        super().__init__()
        h = len(HEADS)
        self.p = torch.nn.Parameter(0.05 * torch.randn(n_users, dim))
        self.a = torch.nn.Parameter(torch.zeros(n_users, h))
        self.q = torch.nn.Parameter(0.05 * torch.randn(n_items, dim))
        self.b = torch.nn.Parameter(torch.zeros(n_items, h))
        self.w = torch.nn.Linear(item_emb.shape[1], dim, bias=False)
        self.r = torch.nn.Parameter(torch.ones(h, dim))
        logit = np.log(np.clip(rates, 1e-4, 1 - 1e-4) / (1 - np.clip(rates, 1e-4, 1 - 1e-4)))
        logit[0] = 0.0                                                   # the play head regresses z ~ N(0,1)
        self.g = torch.nn.Parameter(torch.tensor(logit, dtype=torch.float32))
        self.register_buffer("e", torch.from_numpy(item_emb.astype(np.float32)))

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.q[items] + self.w(self.e[items])                     # (R, D)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, q = self.p[users], self.item_vectors(items)                   # (R, D) each
        scores = self.g + self.a[users] + self.b[items] + (p * q) @ self.r.T          # (R, H)
        penalty = (p.square().sum(1) + q.square().sum(1) + self.a[users].square().sum(1)
                   + self.b[items].square().sum(1)).mean()
        return scores, penalty


def _train(model: _Factorization, users, items, targets, mask, epochs: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=_LR)
    u_t, i_t = torch.from_numpy(users), torch.from_numpy(items)
    y_t, m_t = torch.from_numpy(targets), torch.from_numpy(mask)
    n_head_rows = m_t.sum(0).clamp(min=1).float()                        # (H,)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(u_t), generator=gen)
        total = 0.0
        for start in range(0, len(order), _BATCH):
            idx = order[start:start + _BATCH]
            scores, penalty = model(u_t[idx], i_t[idx])                 # (R, H)
            y, m = y_t[idx], m_t[idx].float()
            per = torch.nn.functional.binary_cross_entropy_with_logits(scores, y.clamp(0, 1), reduction="none")
            per[:, 0] = 0.5 * (scores[:, 0] - y[:, 0]).square()          # play head: MSE on the normal score
            # each head's loss averaged over its own rows (rare heads are not drowned by the history rows)
            loss = ((per * m).sum(0) * (len(order) / n_head_rows) / len(idx)).sum() + _L2 * penalty * len(HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
    return losses


def fit_response_model(fit_log: kuairand.ImpressionLog, cfg: SimulatorConfig, *,
                       all_user_ids: np.ndarray | None = None) -> ResponseModel:
    """Fit on `fit_log` (+ histories). `all_user_ids`: the ids the world must know (default: the fit log's
    and the histories' users); those without data keep the population prior."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    item_ids, durations, emb = catalogue()
    item_row = {int(v): n for n, v in enumerate(item_ids)}
    known = np.unique(np.concatenate([fit_log.user_id, np.fromiter(kuairand.read_user_history(), np.int64),
                                      all_user_ids if all_user_ids is not None else np.zeros(0, np.int64)]))
    user_row = {int(u): n for n, u in enumerate(known)}
    users, items, targets, mask, ratio_table, (log_u, log_i, z) = _training_rows(fit_log, user_row, item_row, rng)
    rates = np.array([targets[mask[:, h], h].mean() for h in range(len(HEADS))])
    # 10% of the log rows are held out of training: the play noise sigma is their residual (the training
    # residual of a factorization is too small), so a sampled play is as uncertain as a new row's
    val = np.zeros(len(users), dtype=bool)
    val[rng.choice(len(log_u), size=len(log_u) // 10, replace=False)] = True
    model = _Factorization(len(known), len(item_ids), emb, cfg.world_dim, rates)
    losses = _train(model, users[~val], items[~val], targets[~val], mask[~val], cfg.world_epochs, cfg.seed)
    with torch.no_grad():
        item_vec = model.item_vectors(torch.arange(len(item_ids))).numpy().astype(np.float64)
        p, a, b = (model.p.numpy().astype(np.float64), model.a.numpy().astype(np.float64),
                   model.b.numpy().astype(np.float64))
        g, r = model.g.numpy().astype(np.float64), model.r.numpy().astype(np.float64)
    # users and items without a single training row keep the prior (their random init means nothing)
    seen_u, seen_i = np.bincount(users, minlength=len(known)) > 0, np.bincount(items, minlength=len(item_ids)) > 0
    p[~seen_u], a[~seen_u] = 0.0, 0.0
    b[~seen_i] = 0.0
    item_vec[~seen_i] = model.w(model.e[torch.from_numpy(np.flatnonzero(~seen_i))]).detach().numpy()

    log_val = val[:len(log_u)]
    _calibrate_intercepts(g, a, b, r, (p[log_u] * item_vec[log_i]), log_u, log_i, targets[:len(log_u)])
    stack = _stack_play_head(g, a, b, r, (p[log_u] * item_vec[log_i]), log_u, log_i, z, log_val)
    s_play = g[0] + a[log_u, 0] + b[log_i, 0] + ((p[log_u] * item_vec[log_i]) @ r[0])
    sigma = float(np.sqrt(max(np.mean((z - s_play)[log_val] ** 2), 1e-3)))
    buckets = bucket_of(durations[log_i])
    n_draw = np.repeat(s_play, 4) + sigma * rng.standard_normal(4 * len(s_play))
    score_q = np.stack([np.quantile(n_draw[np.repeat(buckets, 4) == k], QUANTILE_LEVELS)
                        for k in range(len(BUCKET_EDGES_S) - 1)])
    keep = (fit_log.duration_ms > 0) & np.isin(fit_log.video_id, list(item_row))
    fit_play = np.bincount(log_i, weights=fit_log.play_time_ms[keep] / 1000.0, minlength=len(item_ids))
    repeat_shift, n_repeat = _repeat_shift(fit_log.user_id[keep], fit_log.video_id[keep], fit_log.time_ms[keep],
                                           z - s_play)
    scalars = {
        "sigma": sigma, "play_stack": stack, "repeat_shift": repeat_shift, "n_repeat_rows": n_repeat,
        "crowd_distance": crowd_distance(emb, rng), "train_loss": losses,
        "head_rates": dict(zip(HEADS, rates.tolist())), "n_users": int(len(known)),
        "n_users_fitted": int(seen_u.sum()), "n_items_fitted": int(seen_i.sum()),
        "n_log_rows": int(len(log_u)), "n_rows": int(len(users)), "dim": cfg.world_dim,
        "epochs": cfg.world_epochs, "fit_days": sorted(int(d) for d in np.unique(fit_log.date)),
        "fit_seconds": round(time.perf_counter() - t0, 1), "seed": cfg.seed,
        "source": "KuaiRand-Pure log_standard_2022-04-25_to_05-01 + user_history_2022-04-09_to_04-24 (CC BY-SA 4.0)",
    }
    return ResponseModel(
        user_ids=known.astype(np.int64), user_vec=p, user_bias=a, item_ids=item_ids, item_vec=item_vec,
        item_bias=b, item_duration_s=durations, item_embedding=emb, item_fit_play_s=fit_play,
        head_bias=g, head_weight=r, bucket_edges_s=BUCKET_EDGES_S.copy(), levels=QUANTILE_LEVELS.copy(),
        ratio_quantiles=ratio_table, score_quantiles=score_q, scalars=scalars)


def _calibrate_intercepts(g, a, b, r, inter: np.ndarray, log_u, log_i, log_targets: np.ndarray) -> None:
    """Shift each logistic head's intercept so its mean probability over the log rows is the log's rate
    (in place). The histories' rows (watches, not impressions) pull the intercepts toward their own rates;
    the world serves impressions."""
    from simulator.response import sigmoid

    for h in range(1, len(HEADS)):
        s = g[h] + a[log_u, h] + b[log_i, h] + inter @ r[h]
        target = float(log_targets[:, h].mean())
        lo, hi = -10.0, 10.0
        for _ in range(50):                                  # bisection on the shift: mean sigmoid is monotone
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if sigmoid(s + mid).mean() < target else (lo, mid)
        g[h] += 0.5 * (lo + hi)


def _stack_play_head(g, a, b, r, inter: np.ndarray, log_u, log_i, z: np.ndarray, val: np.ndarray) -> list[float]:
    """Replace the play head by alpha * s_play + beta * s_long_view + c, least squares on the validation
    rows (in place: the heads are linear in g, a, b, r, so head 0 absorbs the combination exactly).
    The long-view head learns from ten times the rows (the histories), so it often predicts a new row's
    play better than the play head does; validation decides how much of each."""
    lv = HEADS.index("long_view")
    heads = [g[h] + a[log_u, h] + b[log_i, h] + inter @ r[h] for h in (0, lv)]       # 2 x (R,)
    x = np.stack([heads[0][val], heads[1][val], np.ones(int(val.sum()))], axis=1)   # (V, 3)
    alpha, beta, c = np.linalg.lstsq(x, z[val], rcond=None)[0]
    g[0] = alpha * g[0] + beta * g[lv] + c
    a[:, 0] = alpha * a[:, 0] + beta * a[:, lv]
    b[:, 0] = alpha * b[:, 0] + beta * b[:, lv]
    r[0] = alpha * r[0] + beta * r[lv]
    return [float(alpha), float(beta), float(c)]


def _repeat_shift(user_ids: np.ndarray, video_ids: np.ndarray, time_ms: np.ndarray,
                  residual: np.ndarray) -> tuple[float, int]:
    """How much lower a re-watched video plays: minus the mean play-score residual of log rows whose
    video the user had already watched (pre-week history or earlier in the fit days). Exact duplicate
    rows (same user, video and time) are left out: the README says about 3% of rows repeat as artefacts."""
    history = kuairand.read_user_history()
    seen: dict[int, dict] = {}
    rewatch = []
    for n, (u, v, t) in enumerate(zip(user_ids.tolist(), video_ids.tolist(), time_ms.tolist())):
        s = seen.get(u)
        if s is None:
            s = seen[u] = {x: -1 for x in history.get(u, {}).get("watch_seq", [])}
        if v in s and s[v] != t:
            rewatch.append(n)
        s[v] = t
    if len(rewatch) < 200:
        return _DEFAULT_REPEAT_SHIFT, len(rewatch)
    return float(max(-np.mean(residual[rewatch]), 0.0)), len(rewatch)


def crowd_distance(emb: np.ndarray, rng: np.random.Generator, share: float = 0.05) -> float:
    """Cosine distance under which two videos count as near-identical: the `share` quantile of the
    distance between random catalogue pairs (fixed from the catalogue, before any policy runs)."""
    a, b = rng.integers(0, len(emb), 20000), rng.integers(0, len(emb), 20000)
    keep = a != b
    dist = 1.0 - np.sum(emb[a[keep]] * emb[b[keep]], axis=1)
    return float(np.quantile(dist, share))
