"""`onerec simulator fit | check | arena`: the World's commands (wired in by simulator/fit.py).

Invariant: `fit` reads only the fit days of the shipped week (the last day is held back), so `check`
without a LOG scores the world on a day it has never seen.

    onerec simulator fit                      # fit the World, write data/simulator/kuairand_world.*
    onerec simulator check [LOG] --json       # world vs popularity on LOG (default: the held-back day)
    onerec simulator arena --days 3 --users 600 --json    # oracle / popular / random in the World
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from simulator import kuairand
from simulator.config import SimulatorConfig


def add_world_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_action", metavar="{fit,check,arena}")
    fit = sub.add_parser("fit", help="fit the World's response model on the first days of the week")
    fit.add_argument("--world-out", default=None, help="artifact path (default: simulator.world_path, else "
                     "data/simulator/kuairand_world.safetensors)")
    check = sub.add_parser("check", help="score a log with the World and a popularity predictor")
    check.add_argument("log", nargs="?", default=None, help="a KuaiRand standard log (csv or csv.gz); "
                       "default: the shipped week's last day")
    check.add_argument("--world", default=None, help="world artifact (default: the shipped one)")
    check.add_argument("--json", dest="check_json", action="store_true", help="print one JSON object")
    arena = sub.add_parser("arena", help="an in-process A/B run of fixed policies in the World")
    arena.add_argument("--arms", default="oracle,popular,random", help="comma-separated arm names")
    arena.add_argument("--reference", default="random", help="the arm the differences are taken against")
    arena.add_argument("--days", type=float, default=3.0, help="simulated days")
    arena.add_argument("--users", type=int, default=600, help="simulated users (a random sample)")
    arena.add_argument("--k", type=int, default=6, help="videos per page")
    arena.add_argument("--world", default=None, help="world artifact (default: the shipped one)")
    arena.add_argument("--json", dest="arena_json", action="store_true", help="print one JSON object")


def run_world_command(args: argparse.Namespace, cfg: SimulatorConfig) -> int:
    if args.world_action == "fit":
        return _fit(args, cfg)
    if args.world_action == "check":
        return _check(args, cfg)
    return _arena(args, cfg)


def _fit(args: argparse.Namespace, cfg: SimulatorConfig) -> int:
    from simulator.response import default_world_path
    from simulator.response_fit import fit_response_model

    out = Path(args.world_out or cfg.world_path or default_world_path())
    log = kuairand.read_log()
    fit_log, held = kuairand.split_last_day(log)
    model = fit_response_model(fit_log, cfg, all_user_ids=np.unique(log.user_id))
    model.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {model.scalars['fit_seconds']} s; "
          f"held back day {int(held.date[0])}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace, cfg: SimulatorConfig) -> int:
    from simulator.check import check_world
    from simulator.response import ResponseModel

    model = ResponseModel.load(args.world or cfg.world_path or None)
    fit_log, held = kuairand.split_last_day(kuairand.read_log())
    try:
        eval_log = held if args.log is None else kuairand.read_log(args.log)
    except (OSError, ValueError) as exc:
        print(f"onerec simulator check: cannot read {args.log}: {exc}", file=sys.stderr)
        return 2
    report = check_world(model, fit_log, eval_log, seed=cfg.seed)
    if args.check_json:
        print(json.dumps(report))
        return 0
    pop = report["popularity"]
    print(f"{report['rows']} rows of days {report['eval_days']}: world vs popularity")
    print(f"  auc_long_view {report['auc_long_view']:.4f} vs {pop['auc_long_view']:.4f}")
    print(f"  auc_like      {report['auc_like']:.4f} vs {pop['auc_like']:.4f}")
    print(f"  max play-time quantile error {report['max_play_quantile_rel_err']:.3f} vs "
          f"{pop['max_play_quantile_rel_err']:.3f}")
    return 0


def _arena(args: argparse.Namespace, cfg: SimulatorConfig) -> int:
    from simulator.arena import fixed_policies, run_arena
    from simulator.world import World

    world = World.load(args.world, cfg)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    policies = fixed_policies(world, seed=cfg.seed)
    unknown = [a for a in arms if a not in policies]
    if unknown or args.reference not in arms:
        bad = unknown[0] if unknown else args.reference
        print(f"onerec simulator arena: unknown arm {bad!r} (fixed arms: {sorted(policies)}; the reference "
              "must be one of --arms)", file=sys.stderr)
        return 2
    report = run_arena(world, {a: policies[a] for a in arms}, days=args.days, n_users=args.users, k=args.k,
                       seed=cfg.seed, reference=args.reference)
    if args.arena_json:
        print(json.dumps(report))
        return 0
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    """The arena report as a text table (one row per arm)."""
    lines = [f"{report['days']:.1f} simulated days, {report['users']} users, "
             f"{report['wall_s']:.1f} s wall ({report['wall_s_per_sim_day']:.1f} s per simulated day)",
             f"{'arm':10s} {'stay s/user-day':>22s} {'sessions':>8s} {'vid/sess':>8s} {'play s':>7s} "
             f"{'like':>6s} {'dislike':>7s} {'cover':>6s} {'gini':>5s} {'cold':>5s} {'oracle%':>7s} {'vs ref':>24s}"]
    for name, arm in report["arms"].items():
        lo, hi = arm["stay_time_ci"]
        diff = report["diff_vs_reference"].get(name)
        dtxt = f"{diff['diff']} [{diff['lo_pct']}, {diff['hi_pct']}]" if diff else "(reference)"
        share = arm.get("oracle_share")
        lines.append(f"{name:10s} {arm['stay_time']:8.1f} [{lo:6.1f},{hi:6.1f}] {arm['sessions_per_user_day']:8.2f} "
                     f"{arm['videos_per_session']:8.2f} {arm['play_time_s']:7.2f} {arm['like_rate']:6.4f} "
                     f"{arm['dislike_rate']:7.5f} {arm['coverage']:6.3f} {arm['gini']:5.3f} "
                     f"{arm['cold_start_share']:5.3f} {100 * share if share is not None else float('nan'):7.1f} "
                     f"{dtxt:>24s}")
    return "\n".join(lines)
