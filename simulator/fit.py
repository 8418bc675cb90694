"""`onerec simulator`: fit the user simulator on the KuaiRand week, check it against the log, save it.

Invariant: the fitted artifact reproduces the log it was fitted on within SimulatorConfig's tolerances;
`check_against_log` is the one definition of "reproduces" (used here and by tests/test_simulator.py).

    onerec simulator                      # fit on data/kuairand-pure/, check, write data/simulator/...
    onerec simulator --check-only         # check the shipped artifact
    onerec simulator fit | check [LOG] --json | arena ...   # the World (simulator/world_cli.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simulator import kuairand
from simulator.config import SimulatorConfig
from simulator.world_cli import add_world_commands, run_world_command
from simulator.users import FLAG_NAMES, SimulatorParams, UserSimulator, default_params_path

# Duration bucket edges in seconds: roughly doubling (log-scale, as F(d) in report sec. 3.1.1) so each
# bucket holds enough rows to pin its quantile function down.
BUCKET_EDGES_S = np.array([0.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0, np.inf])
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)
U_BIN_EDGES = np.linspace(0.0, 1.0, 11)
CHECK_QUANTILES = (0.25, 0.5, 0.75, 0.9)


def bucket_of(duration_s: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(BUCKET_EDGES_S, duration_s, side="right") - 1, 0, len(BUCKET_EDGES_S) - 2)


def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item_ids (N,), durations_s (N,), unit embeddings (N, D)): every KuaiRand video.

    A video without a duration in the features takes the median duration it had in the log, else the
    catalogue median, so every simulated video has a positive duration.
    """
    item_ids, emb = kuairand.item_embeddings()
    durations = kuairand.video_durations_s()
    dur = np.array([durations.get(int(v), 0.0) for v in item_ids])
    log = kuairand.read_log()
    missing = dur <= 0
    if missing.any():
        fallback = float(np.median(dur[~missing]))
        in_log = {}
        for v, d in zip(log.video_id.tolist(), (log.duration_ms / 1000.0).tolist()):
            if d > 0:
                in_log.setdefault(v, []).append(d)
        for n in np.flatnonzero(missing):
            ds = in_log.get(int(item_ids[n]))
            dur[n] = float(np.median(ds)) if ds else fallback
    emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-8)
    return item_ids.astype(np.int64), dur, emb.astype(np.float32)


def _randomized_ranks(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """u in (0, 1): the empirical CDF with ties spread uniformly (so atoms like play = 0 map to a range)."""
    n = len(values)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (below[inverse] + rng.random(n) * counts[inverse]) / n


def log_relevance(log: kuairand.ImpressionLog, item_row: dict[int, int], emb: np.ndarray,
                  window: int) -> np.ndarray:
    """Per log row, cosine of the video with the mean of the user's `window` previous videos (NaN if none),
    the history starting from the pre-week KuaiRand history: the same definition UserSimulator uses."""
    history = kuairand.read_user_history()
    recent: dict[int, deque] = {}
    rel = np.full(len(log), np.nan)
    for i, (u, v) in enumerate(tqdm(zip(log.user_id.tolist(), log.video_id.tolist()), total=len(log),
                                    desc="relevance", leave=False, disable=None)):
        dq = recent.get(u)
        if dq is None:
            warm = history.get(u, {}).get("watch_seq", [])
            dq = recent[u] = deque((item_row[x] for x in warm if x in item_row), maxlen=window)
        row = item_row.get(v)
        if dq and row is not None:
            m = emb[list(dq)].mean(axis=0)
            norm = float(np.linalg.norm(m))
            if norm > 0:
                rel[i] = float(emb[row] @ m) / norm
        if row is not None:
            dq.append(row)
    return rel


def fit_params(log: kuairand.ImpressionLog, cfg: SimulatorConfig) -> SimulatorParams:
    """Fit the copula model of simulator/users.py on the log (rows with a positive duration)."""
    rng = np.random.default_rng(cfg.seed)
    item_ids, durations_s, emb = catalogue()
    item_row = {int(v): n for n, v in enumerate(item_ids)}
    rel_all = log_relevance(log, item_row, emb, cfg.relevance_window)

    keep = log.duration_ms > 0
    duration = log.duration_ms[keep] / 1000.0
    ratio = (log.play_time_ms[keep] / 1000.0) / duration
    bucket = bucket_of(duration)
    n_buckets = len(BUCKET_EDGES_S) - 1

    # quantile functions of play/duration per bucket and each row's latent uniform within its bucket
    ratio_q = np.zeros((n_buckets, len(QUANTILE_LEVELS)))
    u = np.zeros(len(ratio))
    for b in range(n_buckets):
        m = bucket == b
        if m.sum() < 20:
            raise ValueError(f"duration bucket {b} ({BUCKET_EDGES_S[b]}-{BUCKET_EDGES_S[b + 1]} s) has "
                             f"{int(m.sum())} rows; need >= 20 to fit")
        ratio_q[b] = np.quantile(ratio[m], QUANTILE_LEVELS)
        u[m] = _randomized_ranks(ratio[m], rng)
    normal_score = torch.special.ndtri(torch.from_numpy(np.clip(u, 1e-6, 1 - 1e-6))).numpy()

    # relevance: standardize within each duration bucket (relevance and duration are correlated through
    # the content part of the embeddings; per-bucket z keeps each bucket's marginal at any strength);
    # no history -> z = 0
    rel = rel_all[keep]
    has_rel = np.isfinite(rel)
    rel_mean, rel_std = np.zeros(n_buckets), np.ones(n_buckets)
    for b in range(n_buckets):
        m = has_rel & (bucket == b)
        rel_mean[b], rel_std[b] = rel[m].mean(), rel[m].std() + 1e-8
    z = np.where(has_rel, (rel - rel_mean[bucket]) / rel_std[bucket], 0.0)

    # n = b_user + c z + e: c by least squares (pooled), b_user by shrunk per-user mean of the rest
    c = float((z * normal_score).sum() / (z * z).sum())
    resid = normal_score - c * z
    users, user_idx = np.unique(log.user_id[keep], return_inverse=True)
    count = np.bincount(user_idx).astype(np.float64)
    user_mean = np.bincount(user_idx, weights=resid) / count
    within = float(((resid - user_mean[user_idx]) ** 2).sum() / max(len(resid) - len(users), 1))
    between = float(np.average((user_mean - resid.mean()) ** 2, weights=count) - within * len(users) / len(resid))
    between = max(between, 1e-3)
    shrink = count / (count + within / between)         # (U,) empirical Bayes weight on the user's mean
    offset = shrink * (user_mean - resid.mean())
    noise = resid - resid.mean() - offset[user_idx]
    user_var = float(offset[user_idx].var())
    noise_var = float(noise.var())

    flag_probs = _flag_tables(log, keep, bucket, u, n_buckets)

    scalars = {
        "relevance_coef": c,
        "relevance_corr": float(np.corrcoef(z[has_rel], normal_score[has_rel])[0, 1]),
        "user_var": user_var, "noise_var": noise_var, "relevance_window": cfg.relevance_window,
        "n_rows": int(keep.sum()), "n_users": int(len(users)),
        "log_like_rate": float(log.is_like[keep].mean()), "log_dislike_rate": float(log.is_hate[keep].mean()),
        "source": "KuaiRand-Pure log_standard_2022-04-25_to_05-01 (CC BY-SA 4.0)",
    }
    return SimulatorParams(
        bucket_edges_s=BUCKET_EDGES_S.copy(), quantile_levels=QUANTILE_LEVELS.copy(), ratio_quantiles=ratio_q,
        u_bin_edges=U_BIN_EDGES.copy(), flag_probs=flag_probs, relevance_mean=rel_mean, relevance_std=rel_std,
        user_ids=users.astype(np.int64),
        user_offset=offset, item_ids=item_ids, item_durations_s=durations_s, item_embeddings=emb,
        scalars=scalars)

def _flag_tables(log: kuairand.ImpressionLog, keep: np.ndarray, bucket: np.ndarray, u: np.ndarray,
                 n_buckets: int) -> np.ndarray:
    """P(flag | duration bucket, u-bin) per flag, smoothed toward the u-bin margin (dislikes: u-bin only)."""
    u_bin = np.clip(np.searchsorted(U_BIN_EDGES, u, side="right") - 1, 0, len(U_BIN_EDGES) - 2)
    n_bins = len(U_BIN_EDGES) - 1
    columns = {"like": log.is_like, "follow": log.is_follow, "comment": log.is_comment,
               "forward": log.is_forward, "dislike": log.is_hate}
    flag_probs = np.zeros((len(FLAG_NAMES), n_buckets, n_bins))
    cell = bucket * n_bins + u_bin
    cell_n = np.bincount(cell, minlength=n_buckets * n_bins).reshape(n_buckets, n_bins)
    bin_n = np.bincount(u_bin, minlength=n_bins)
    for f, name in enumerate(FLAG_NAMES):
        hits = columns[name][keep].astype(np.float64)
        bin_p = np.bincount(u_bin, weights=hits, minlength=n_bins) / np.maximum(bin_n, 1)
        if name == "dislike":
            flag_probs[f] = bin_p[None, :]
            continue
        cell_k = np.bincount(cell, weights=hits, minlength=n_buckets * n_bins).reshape(n_buckets, n_bins)
        prior = 200.0  # pseudo-rows: a cell needs a few hundred rows before it leaves the margin
        flag_probs[f] = (cell_k + prior * bin_p[None, :]) / (cell_n + prior)
    return flag_probs


def check_against_log(sim: UserSimulator, log: kuairand.ImpressionLog, *, rows: int,
                      seed: int = 0) -> dict:
    """Replay `rows` random log impressions (user, video) through the simulator; compare with the log.

    Each impression sees the history the user had at that moment in the log (pre-week history plus the
    week's earlier rows), as in the fit, so relevance is distributed as it was when fitted.

    Returns per duration bucket the log's and the simulator's play-time quantiles (CHECK_QUANTILES),
    and the like and dislike rates of both. Durations are the catalogue's (what the loop serves).
    """
    known_u = np.isin(log.user_id, sim.user_ids)
    known_i = np.isin(log.video_id, sim.item_ids)
    candidates = np.flatnonzero(known_u & known_i & (log.duration_ms > 0))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(candidates, size=min(rows, len(candidates)), replace=False))
    item_row = {int(v): n for n, v in enumerate(sim.item_ids)}
    relevance = log_relevance(log, item_row, sim.params.item_embeddings, sim.cfg.relevance_window)
    sim_out = sim.respond_with_relevance(log.user_id[pick], log.video_id[pick], relevance[pick])
    sim_duration = sim.durations_s[[item_row[int(v)] for v in log.video_id[pick]]]
    log_play = log.play_time_ms[pick] / 1000.0
    log_bucket, sim_bucket = bucket_of(log.duration_ms[pick] / 1000.0), bucket_of(sim_duration)
    buckets = []
    for b in range(len(BUCKET_EDGES_S) - 1):
        lm, sm = log_bucket == b, sim_bucket == b
        if lm.sum() < 50 or sm.sum() < 50:
            continue
        buckets.append({
            "bucket": b, "duration_s": [float(BUCKET_EDGES_S[b]), float(BUCKET_EDGES_S[b + 1])],
            "n_log": int(lm.sum()), "n_sim": int(sm.sum()),
            "log_play_quantiles_s": [float(x) for x in np.quantile(log_play[lm], CHECK_QUANTILES)],
            "sim_play_quantiles_s": [float(x) for x in np.quantile(sim_out["play_time_s"][sm], CHECK_QUANTILES)],
        })
    return {
        "rows": int(len(pick)), "quantiles": list(CHECK_QUANTILES), "buckets": buckets,
        "log_like_rate": float(log.is_like[pick].mean()), "sim_like_rate": float(sim_out["like"].mean()),
        "log_dislike_rate": float(log.is_hate[log.duration_ms > 0].mean()),
        "sim_dislike_rate": float(sim_out["dislike"].mean()),
    }


def tolerance_failures(report: dict, cfg: SimulatorConfig) -> list[str]:
    """What in `check_against_log`'s report lies outside SimulatorConfig's tolerances (empty = fits)."""
    bad = []
    for b in report["buckets"]:
        for q, lq, sq in zip(report["quantiles"], b["log_play_quantiles_s"], b["sim_play_quantiles_s"]):
            if abs(sq - lq) > max(cfg.tol_play_quantile_rel * lq, cfg.tol_play_quantile_abs_s):
                bad.append(f"bucket {b['duration_s']} s p{int(q * 100)}: sim {sq:.2f} s vs log {lq:.2f} s")
    for name, tol in (("like", cfg.tol_like_rate_rel), ("dislike", cfg.tol_dislike_rate_rel)):
        lr, sr = report[f"log_{name}_rate"], report[f"sim_{name}_rate"]
        if abs(sr - lr) > tol * lr:
            bad.append(f"{name} rate: sim {sr:.5f} vs log {lr:.5f} (tolerance {tol:.0%})")
    return bad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="where to write the parameters "
                        "(default: simulator.params_path, else data/simulator/kuairand_simulator.safetensors)")
    parser.add_argument("--check-only", action="store_true", help="check the existing parameters, do not refit")
    parser.add_argument("--json", action="store_true", help="print the check report as one JSON object")
    add_world_commands(parser)


def main(args: argparse.Namespace, cfg) -> int:
    sim_cfg: SimulatorConfig = cfg.simulator
    if getattr(args, "world_action", None):
        return run_world_command(args, sim_cfg)
    out = Path(args.out or sim_cfg.params_path or default_params_path())
    log = kuairand.read_log()
    if not args.check_only:
        params = fit_params(log, sim_cfg)
        params.save(out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    sim = UserSimulator(SimulatorParams.load(out), sim_cfg)
    report = check_against_log(sim, log, rows=sim_cfg.fit_check_rows, seed=sim_cfg.seed)
    report["scalars"] = sim.params.scalars
    failures = tolerance_failures(report, sim_cfg)
    report["failures"] = failures
    if args.json:
        print(json.dumps(report))
    else:
        print(f"checked on {report['rows']} log impressions; play time quantiles {report['quantiles']} (s):")
        for b in report["buckets"]:
            lo, hi = b["duration_s"]
            print(f"  duration {lo:5.0f}-{hi:<5.0f} log {_fmt(b['log_play_quantiles_s'])}  "
                  f"sim {_fmt(b['sim_play_quantiles_s'])}")
        print(f"  like rate    log {report['log_like_rate']:.4f}  sim {report['sim_like_rate']:.4f}")
        print(f"  dislike rate log {report['log_dislike_rate']:.5f}  sim {report['sim_dislike_rate']:.5f}")
        print(f"  relevance: corr with the log's play score {sim.params.scalars['relevance_corr']:.3f}, "
              f"fitted coef {sim.params.scalars['relevance_coef']:.3f}, used {sim.relevance_coef:.3f} "
              f"(simulator.relevance_strength)")
        print("within tolerances" if not failures else "OUT OF TOLERANCE:\n  " + "\n  ".join(failures))
    return 0 if not failures else 1


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:7.2f}" for v in values)
