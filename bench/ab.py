"""A/B arms in the running system on the embedded world: which objective gives users the most stay time.

A bounded `onerec ab` (at most 20 minutes on 2 cores) with every arm: gbpo, ecpo, sft, gbpo-legacy
(learned, each with its own learner, versions and replica) and popular, random, oracle (fixed), all
under the same simulated population and clock. Prints ONE JSON object: the `onerec ab` report with
`arms.<name>.stay_time`, `.stay_time_ci`, `.oracle_share`, `.coverage`, ..., `diff_vs_sft.<name>.lo/.hi`,
plus `targets` (each of the issue's targets: met or not) and the run's settings.

    python bench/ab.py                      # ~15 minutes
    python bench/ab.py --duration 300 --arms sft,gbpo,oracle,random
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.ab import plot_ab, run_ab  # noqa: E402
from actors.arms import DEFAULT_AB_ARMS, parse_arms  # noqa: E402
from infra.broker import free_port  # noqa: E402
from onerec.config import Config  # noqa: E402


def targets(report: dict) -> dict:
    arms, diffs = report["arms"], report["diff_vs_sft"]
    learned = [n for n in ("gbpo", "ecpo", "sft", "gbpo-legacy") if n in arms]
    out = {}
    if {"popular", "random"} <= set(arms):
        floor = max(arms["popular"]["stay_time"], arms["random"]["stay_time"])
        out["learned_beat_popular_and_random"] = {n: arms[n]["stay_time"] > floor for n in learned}
    if "gbpo" in arms and "oracle_share" in arms["gbpo"]:
        out["gbpo_oracle_share_ge_0.6"] = arms["gbpo"]["oracle_share"] >= 0.6
    out["no_collapse_coverage_ge_0.05"] = {n: (arms[n].get("coverage") or 0.0) >= 0.05 for n in learned}
    if "gbpo" in diffs:
        out["gbpo_beats_sft_ci_above_0"] = diffs["gbpo"]["lo"] > 0
    if {"gbpo", "gbpo-legacy"} <= set(arms):
        out["gbpo_beats_gbpo_legacy"] = arms["gbpo"]["stay_time"] > arms["gbpo-legacy"]["stay_time"]
    return out


def pretrain(workdir: str, seconds: float) -> str:
    """`onerec pretrain` for `seconds` into workdir/pretrain (its own process: its threads, its memory)."""
    import subprocess

    out = f"{workdir}/pretrain"
    subprocess.run([sys.executable, "-m", "onerec.cli", "pretrain", "--time-budget", str(seconds), "--out", out,
                    "--show-users", "0"], check=True, stdout=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=900.0, help="wall seconds of traffic (<= 1200)")
    parser.add_argument("--arms", default=",".join(DEFAULT_AB_ARMS))
    parser.add_argument("--users", type=int, default=None, help="simulated users over all arms (simulator.ab_users)")
    parser.add_argument("--out", default=None, help="folder for ab.json and ab.png (default: a temp folder)")
    parser.add_argument("--pretrain-s", type=float, default=120.0,
                        help="seconds of `onerec pretrain` on the KuaiRand week first; every learned arm starts from "
                             "its weights (the report's RL is post-training); 0 = random init")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="onerec-bench-ab-")
    init_from = pretrain(workdir, args.pretrain_s) if args.pretrain_s > 0 else ""
    overrides = [f"stream.bootstrap_servers=127.0.0.1:{free_port()}", "stream.namespace=benchab",
                 f"loop.checkpoint_dir={workdir}/checkpoints", f"loop.init_from={init_from}", "serve.bridge_port=0",
                 "loop.progress_every_s=30", f"drift.log_path={workdir}/drift.jsonl", *args.set]
    if args.users:
        overrides.append(f"simulator.ab_users={args.users}")
    cfg = Config.load(overrides=overrides)
    users = cfg.simulator.ab_users
    specs = parse_arms(args.arms, require_sft=True)
    start = time.monotonic()
    report = run_ab(cfg, specs, duration_s=args.duration, log_dir=f"{workdir}/logs", out=sys.stderr)
    out = Path(args.out or workdir)
    out.mkdir(parents=True, exist_ok=True)
    plot_ab(report, out / "ab.png")
    report.update({"targets": targets(report), "wall_s": round(time.monotonic() - start, 1),
                   "duration_s": args.duration, "users": users, "plot": str(out / "ab.png"),
                   "pretrain_s": args.pretrain_s})
    (out / "ab.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
