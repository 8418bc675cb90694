"""The predictive check: score a KuaiRand log the world was not fitted on, against a popularity predictor.

Invariant: both predictors are fitted on the same rows (the fit days) and scored on the same held-back
rows in the same run; a row the world cannot place (unknown video, zero duration) is left out of both.

`check_world(model, fit_log, eval_log)` returns one JSON-ready dict:
    auc_long_view, auc_like                  the world's P(long view), P(like) against the log's labels
    play_quantiles                           per duration bucket: the log's p25/p50/p75/p90 play time, the
                                             world's (one sampled play per row), |error| / max(log, 1 s)
    like_rate / dislike_rate                 log vs the world's mean predicted probability
    popularity: {the same keys}              the popularity predictor (below)
The popularity predictor knows only the video: its smoothed long-view and like rates on the fit days,
and its smoothed mean play score (the normal score of play / duration within its duration bucket) pushed
through the same copula, so its play-time law per bucket is also the log's.

`tolerance_report(model, log)` replays the log's (user, video) pairs through the world's sampler in the
format of simulator/fit.py's `check_against_log`, so `tolerance_failures` applies to it unchanged.
"""
from __future__ import annotations

import numpy as np

from simulator import kuairand
from simulator.fit import BUCKET_EDGES_S, CHECK_QUANTILES, bucket_of
from simulator.response import HEADS, ResponseModel, sigmoid
from simulator.response_fit import bucket_of as world_bucket_of, normal_scores

_PRIOR_ROWS = 20.0   # pseudo-rows shrinking a video's rates toward the population's


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN if one class is missing."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s))
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    mid = start + (counts + 1) / 2.0                       # average 1-based rank of each tie group
    ranks[order] = np.repeat(mid, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _placeable(model: ResponseModel, log: kuairand.ImpressionLog) -> np.ndarray:
    return np.flatnonzero((log.duration_ms > 0) & np.isin(log.video_id, model.item_ids))


def world_scores(model: ResponseModel, log: kuairand.ImpressionLog) -> tuple[np.ndarray, np.ndarray]:
    """(item rows (R,), scores (R, H)) for the log rows the world can place, users at their fitted taste."""
    item_row = {int(v): n for n, v in enumerate(model.item_ids)}
    user_row = {int(u): n for n, u in enumerate(model.user_ids)}
    idx = _placeable(model, log)
    rows = np.array([item_row[int(v)] for v in log.video_id[idx]], dtype=np.int64)
    urows = np.array([user_row.get(int(u), -1) for u in log.user_id[idx]], dtype=np.int64)
    uvec = np.where(urows[:, None] >= 0, model.user_vec[urows], 0.0)                  # (R, D) prior = 0
    ubias = np.where(urows[:, None] >= 0, model.user_bias[urows], 0.0)                # (R, H)
    scores = (model.head_bias[None, :] + ubias + model.item_bias[rows]
              + (model.item_vec[rows] * uvec) @ model.head_weight.T)
    return rows, scores


def popularity_scores(model: ResponseModel, fit_log: kuairand.ImpressionLog, rows: np.ndarray,
                      seed: int = 0) -> np.ndarray:
    """(R, H) scores of the popularity predictor for item rows (R,): logits of the video's smoothed
    rates (long view, like, dislike), and its smoothed mean play score in the play column."""
    n = len(model.item_ids)
    item_row = {int(v): k for k, v in enumerate(model.item_ids)}
    idx = _placeable(model, fit_log)
    fr = np.array([item_row[int(v)] for v in fit_log.video_id[idx]], dtype=np.int64)
    dur = fit_log.duration_ms[idx] / 1000.0
    z, _ = normal_scores((fit_log.play_time_ms[idx] / 1000.0) / dur, world_bucket_of(dur),
                         np.random.default_rng(seed))
    count = np.bincount(fr, minlength=n)
    out = np.zeros((len(rows), len(HEADS)))
    out[:, 0] = (np.bincount(fr, weights=z, minlength=n) / (count + _PRIOR_ROWS))[rows]
    labels = {"long_view": fit_log.long_view, "like": fit_log.is_like, "follow": fit_log.is_follow,
              "comment": fit_log.is_comment, "forward": fit_log.is_forward, "dislike": fit_log.is_hate}
    for h, y in labels.items():
        y = y[idx].astype(np.float64)
        rate = (np.bincount(fr, weights=y, minlength=n) + _PRIOR_ROWS * y.mean()) / (count + _PRIOR_ROWS)
        rate = np.clip(rate, 1e-6, 1 - 1e-6)
        out[:, HEADS.index(h)] = np.log(rate / (1 - rate))[rows]
    return out


def _copula_for(model: ResponseModel, scores_fit: np.ndarray, z_fit: np.ndarray, rows_fit: np.ndarray,
                rng: np.random.Generator) -> ResponseModel:
    """A copy of the model whose sigma and F_b are refitted for another play score (the popularity one)."""
    sigma = float(np.sqrt(max(np.mean((z_fit - scores_fit) ** 2), 1e-3)))
    buckets = model.bucket_of(model.item_duration_s[rows_fit])
    n = np.repeat(scores_fit, 4) + sigma * rng.standard_normal(4 * len(scores_fit))
    bq = np.repeat(buckets, 4)
    score_q = np.stack([np.quantile(n[bq == b], model.levels) if (bq == b).any() else model.score_quantiles[b]
                        for b in range(model.score_quantiles.shape[0])])
    fields = {k: getattr(model, k) for k in ResponseModel._ARRAYS}
    fields["score_quantiles"] = score_q
    return ResponseModel(**fields, scalars={**model.scalars, "sigma": sigma})


def _predictor_report(model: ResponseModel, scores: np.ndarray, rows: np.ndarray,
                      log: kuairand.ImpressionLog, idx: np.ndarray, rng: np.random.Generator) -> dict:
    s_play = scores[:, 0]
    p_lv = model.p_long_view(s_play, rows)
    p_like = sigmoid(scores[:, HEADS.index("like")])
    p_dislike = sigmoid(scores[:, HEADS.index("dislike")])
    sampled = model.sample(scores, rows, rng)["play_time_s"]
    log_play = log.play_time_ms[idx] / 1000.0
    buckets = bucket_of(log.duration_ms[idx] / 1000.0)
    per_bucket = []
    for b in np.unique(buckets):
        m = buckets == b
        if m.sum() < 50:
            continue
        lq = np.quantile(log_play[m], CHECK_QUANTILES)
        pq = np.quantile(sampled[m], CHECK_QUANTILES)
        per_bucket.append({"duration_s": [float(BUCKET_EDGES_S[b]), float(BUCKET_EDGES_S[b + 1])],
                           "n": int(m.sum()), "log_s": [round(float(x), 3) for x in lq],
                           "pred_s": [round(float(x), 3) for x in pq],
                           "rel_err": [round(float(abs(p - q) / max(q, 1.0)), 4) for p, q in zip(pq, lq)]})
    return {"auc_long_view": auc(p_lv, log.long_view[idx]), "auc_like": auc(p_like, log.is_like[idx]),
            "quantiles": list(CHECK_QUANTILES), "play_quantiles": per_bucket,
            "max_play_quantile_rel_err": max(max(b["rel_err"]) for b in per_bucket),
            "like_rate": {"log": float(log.is_like[idx].mean()), "pred": float(p_like.mean())},
            "dislike_rate": {"log": float(log.is_hate[idx].mean()), "pred": float(p_dislike.mean())},
            "long_view_rate": {"log": float(log.long_view[idx].mean()), "pred": float(p_lv.mean())}}


def check_world(model: ResponseModel, fit_log: kuairand.ImpressionLog, eval_log: kuairand.ImpressionLog,
                seed: int = 0) -> dict:
    """The world vs the popularity predictor on `eval_log` (both fitted on `fit_log`): one JSON-ready dict."""
    rng = np.random.default_rng(seed)
    idx = _placeable(model, eval_log)
    rows, scores = world_scores(model, eval_log)
    out = {"rows": int(len(idx)), "skipped_rows": int(len(eval_log) - len(idx)),
           "eval_days": sorted(int(d) for d in np.unique(eval_log.date)),
           **_predictor_report(model, scores, rows, eval_log, idx, rng)}
    fit_rows, _ = world_scores(model, fit_log)
    fit_idx = _placeable(model, fit_log)
    dur = fit_log.duration_ms[fit_idx] / 1000.0
    z_fit, _ = normal_scores((fit_log.play_time_ms[fit_idx] / 1000.0) / dur, world_bucket_of(dur),
                             np.random.default_rng(seed))
    pop_fit = popularity_scores(model, fit_log, fit_rows, seed)
    pop_model = _copula_for(model, pop_fit[:, 0], z_fit, fit_rows, rng)
    pop = popularity_scores(model, fit_log, rows, seed)
    out["popularity"] = _predictor_report(pop_model, pop, rows, eval_log, idx, rng)
    return out


def tolerance_report(model: ResponseModel, log: kuairand.ImpressionLog, *, rows: int, seed: int = 0) -> dict:
    """`simulator.fit.check_against_log`'s report for the world: `rows` random log pairs sampled once."""
    rng = np.random.default_rng(seed)
    idx_all = _placeable(model, log)
    pick = np.sort(rng.choice(len(idx_all), size=min(rows, len(idx_all)), replace=False))
    sub = log.take(idx_all[pick])
    item_rows, scores = world_scores(model, sub)
    sim = model.sample(scores, item_rows, rng)
    log_play = sub.play_time_ms / 1000.0
    buckets = bucket_of(sub.duration_ms / 1000.0)
    sim_buckets = bucket_of(model.item_duration_s[item_rows])
    report_buckets = []
    for b in range(len(BUCKET_EDGES_S) - 1):
        lm, sm = buckets == b, sim_buckets == b
        if lm.sum() < 50 or sm.sum() < 50:
            continue
        report_buckets.append({
            "bucket": b, "duration_s": [float(BUCKET_EDGES_S[b]), float(BUCKET_EDGES_S[b + 1])],
            "n_log": int(lm.sum()), "n_sim": int(sm.sum()),
            "log_play_quantiles_s": [float(x) for x in np.quantile(log_play[lm], CHECK_QUANTILES)],
            "sim_play_quantiles_s": [float(x) for x in np.quantile(sim["play_time_s"][sm], CHECK_QUANTILES)]})
    return {"rows": int(len(sub)), "quantiles": list(CHECK_QUANTILES), "buckets": report_buckets,
            "log_like_rate": float(sub.is_like.mean()), "sim_like_rate": float(sim["like"].mean()),
            "log_dislike_rate": float(sub.is_hate.mean()), "sim_dislike_rate": float(sim["dislike"].mean())}
