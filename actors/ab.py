"""`onerec ab`: A/B arms under the same traffic, in the running system; one JSON report and a plot.

Invariant: the arms are checked before anything starts (a bad list stops with a message naming the
arm); users are split by `streaming.arms.arm_of`; every arm sees the same population, the same
clock and the same legacy share; each learned arm trains only on its own arm's samples.

    onerec ab --arms gbpo,ecpo,sft,gbpo-legacy,popular,random,oracle --duration 900 --out runs/ab

The report (also `bench/ab.py`'s output): per arm App Stay Time per user-day with a 95% bootstrap
interval over users, play time, like and dislike rates, sessions per user-day, videos per session,
coverage, Gini and cold-start share of what the arm itself served, the arm's share of the oracle's
stay time, samples trained, versions published and learner down-time; and each arm against `sft` in
the report's format (+x.xxx%, Tables 6 and 7) with its interval.
"""
from __future__ import annotations

import argparse
import dataclasses
import asyncio
import json
import logging
import sys
from pathlib import Path

from actors.arms import DEFAULT_AB_ARMS, parse_arms
from actors.loop import Loop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arms", default=",".join(DEFAULT_AB_ARMS), metavar="A,B,...",
                        help=f"arms, in order (default {','.join(DEFAULT_AB_ARMS)}); `sft` is required")
    parser.add_argument("--duration", type=float, default=600.0, metavar="SECONDS", help="wall-clock length of the run")
    parser.add_argument("--out", default="runs/ab", help="where ab.json and ab.png go")
    parser.add_argument("--log-dir", default="runs/logs", help="where the join worker and broker logs go")
    parser.add_argument("--json", action="store_true", help="print only the JSON report")


def main(args: argparse.Namespace, cfg) -> int:
    from actors.driver import cli_passthrough

    try:
        specs = parse_arms(args.arms, require_sft=True)
    except ValueError as exc:
        print(f"onerec ab: {exc}", file=sys.stderr)
        return 2
    if not args.duration or args.duration <= 0:
        print("onerec ab: --duration must be > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report = run_ab(cfg, specs, duration_s=args.duration, cli_args=cli_passthrough(args), log_dir=args.log_dir,
                    out=sys.stderr if args.json else sys.stdout)
    out = Path(getattr(args, "out", "runs/ab"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(report, indent=1))
    plot_ab(report, out / "ab.png")
    print(json.dumps(report) if args.json else format_report(report))
    if not args.json:
        print(f"report: {out / 'ab.json'}, plot: {out / 'ab.png'}")
    return 0


def run_ab(cfg, specs, *, duration_s: float, cli_args=(), log_dir: str = "runs/logs", out=sys.stdout) -> dict:
    """Run the loop with these arms for `duration_s` and return the report."""
    from simulator.traffic import WorldTraffic

    names = [s.name for s in specs]
    cfg = dataclasses.replace(cfg, simulator=dataclasses.replace(
        cfg.simulator, users=cfg.simulator.ab_users, concurrency=cfg.simulator.ab_concurrency))

    def traffic(loop: Loop) -> WorldTraffic:
        return WorldTraffic(loop.cfg, loop.url, arms=names, token=loop.cfg.serve.api_token, experiment=True)

    loop = Loop(cfg, arms=specs, cli_args=list(cli_args), log_dir=log_dir, traffic_factory=traffic, out=out)
    asyncio.run(loop.run(duration_s=duration_s))
    return ab_report(loop)


def ab_report(loop: Loop) -> dict:
    """The traffic's ledgers plus what each learned arm's learner did."""
    reference = "sft" if "sft" in loop.traffic.arms else None
    report = loop.traffic.report(reference=reference)
    for name, arm in loop.arms.items():
        status = arm.last_status or {}
        stats = status.get("stats", {})
        report["arms"].setdefault(name, {}).update({
            "samples_trained": stats.get("trained", 0), "learner_steps": status.get("step", 0),
            "versions": status.get("version", 0), "learner_restarts": arm.restarts, "learner_down_s": arm.down_s,
            "objective": {"algorithm": arm.spec.algorithm, "rl_on": arm.spec.rl_on}})
    report["diff_vs_sft"] = report.pop("diff_vs_reference")
    return report


def format_report(report: dict) -> str:
    rows = [f"{report['simulated_days']:.2f} simulated days",
            f"{'arm':12s} {'stay s/user-day':>16s} {'95% CI':>17s} {'vs sft':>9s} {'oracle':>7s} {'play/video':>10s} "
            f"{'like':>6s} {'dislike':>7s} {'sess/day':>8s} {'coverage':>8s} {'gini':>6s} {'users':>5s}"]
    for name, a in report["arms"].items():
        diff = report["diff_vs_sft"].get(name, {}).get("diff", "")
        ci = a.get("stay_time_ci") or [float("nan")] * 2
        rows.append(f"{name:12s} {a.get('stay_time', float('nan')):16.1f} {ci[0]:8.1f}-{ci[1]:<8.1f} {diff:>9s} "
                    f"{a.get('oracle_share', float('nan')):7.3f} {a.get('play_time_s') or float('nan'):10.2f} "
                    f"{a.get('like_rate') or float('nan'):6.3f} {a.get('dislike_rate') or float('nan'):7.4f} "
                    f"{a.get('sessions_per_user_day', float('nan')):8.2f} {a.get('coverage') or float('nan'):8.3f} "
                    f"{a.get('gini') or float('nan'):6.3f} {a.get('users', 0):5d}")
    return "\n".join(rows)


def plot_ab(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["arms"])
    stay = [report["arms"][n].get("stay_time", 0.0) for n in names]
    ci = [report["arms"][n].get("stay_time_ci") or [s, s] for n, s in zip(names, stay)]
    err = [[s - c[0] for s, c in zip(stay, ci)], [c[1] - s for s, c in zip(stay, ci)]]
    cover = [report["arms"][n].get("coverage") or 0.0 for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(names, stay, yerr=err, capsize=4, color="tab:blue")
    axes[0].set_title(f"App Stay Time per user-day (s), 95% CI ({report['simulated_days']:.1f} simulated days)")
    axes[1].bar(names, cover, color="tab:green")
    axes[1].set_title("coverage of the catalogue by the arm's own pages")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
