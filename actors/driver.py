"""`onerec run`: the whole loop on one machine (or a Ray cluster), and what it prints while it runs.

The loop itself is `actors.loop.Loop`; this module parses the command line, builds the arms
(`--arms`: an A/B run, as `onerec ab`; without it, one learned arm with `train.algorithm`), runs the
loop for `--duration` seconds, and prints a progress line every `loop.progress_every_s` and a
per-version table at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from actors.loop import Loop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: loop.duration_s; 0 = until Ctrl-C)")
    parser.add_argument("--no-traffic", action="store_true", help="start everything but the user simulator")
    parser.add_argument("--log-dir", default="runs/logs", help="where the join worker and broker logs go")
    parser.add_argument("--arms", default=None, metavar="A,B,...",
                        help="run an A/B experiment with these arms instead (see `onerec ab --help`)")


def cli_passthrough(args: argparse.Namespace) -> list[str]:
    """The config arguments again, for the join worker subprocess."""
    out = (["--config", args.config] if args.config else []) + [a for s in args.set for a in ("--set", s)]
    return out + (["--preset", args.preset] if args.preset else [])


def main(args: argparse.Namespace, cfg) -> int:
    if args.arms:
        from actors import ab

        return ab.main(args, cfg)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    duration = cfg.loop.duration_s if args.duration is None else args.duration
    if duration < 0:
        print("onerec run: --duration must be >= 0", file=sys.stderr)
        return 2
    loop = Loop(cfg, cli_args=cli_passthrough(args), log_dir=args.log_dir, traffic=not args.no_traffic)
    rc = asyncio.run(loop.run(duration_s=duration))
    print(summary_table(loop.last_status, loop.traffic))
    if loop.traffic is not None and loop.traffic.ledger.max_t > 0:
        path = f"{args.log_dir}/stay_time.png"
        loop.traffic.plot_stay_time(path)
        print(f"stay time per simulated day: {path}")
    return rc


def progress_line(status: dict, bridge, elapsed_s: float, *, arm: str | None = None, traffic=None) -> str:
    """One line: version, replicas, throughput, and what users did with the latest served versions."""
    replicas = ",".join(str(v) for v in status.get("replica_versions", {}).values())
    head = f"[{elapsed_s:6.1f}s] " + (f"{arm}: " if arm else "")
    parts = [f"{head}v{status['version']} (replicas {replicas or '-'})",
             f"step {status['step']}", f"{status['samples_per_s']:.1f} samples/s",
             f"req {bridge.requests if bridge else 0}"]
    losses = status.get("losses") or {}
    if losses:
        parts.append(f"loss {losses.get('loss', float('nan')):.3f}")
    stay = getattr(traffic, "stay_time_so_far", None)
    if stay is not None:
        value = stay(arm)
        if value is not None:
            parts.append(f"stay {value:.0f}s/user-day")
    shown = [(v, c) for v, c in sorted(status.get("by_version", {}).items(), key=lambda kv: int(kv[0]))
             if c.get("feedback")][-2:]
    for version, c in shown:
        n = c["feedback"]
        parts.append(f"served v{version}: pos {c['positives'] / n:.1%} dislike {c['dislikes'] / n:.1%} "
                     f"play {c['play_time_ms'] / n / 1000:.1f}s (n={n})")
    return " | ".join(parts)


def summary_table(status: dict, traffic) -> str:
    """Per serving version: samples trained, positive and dislike shares, mean play time (and the
    traffic's requests served by it), then the traffic's stay time per simulated day."""
    rows = ["version  samples  positive  dislike  play_s"]
    for version, c in sorted((status or {}).get("by_version", {}).items(), key=lambda kv: int(kv[0])):
        n = c.get("feedback", 0)
        if n:
            rows.append(f"{int(version):7d}  {c['samples']:7d}  {c['positives'] / n:8.1%}  {c['dislikes'] / n:7.1%}"
                        f"  {c['play_time_ms'] / n / 1000:6.1f}")
    if traffic is not None and hasattr(traffic, "summary"):
        rows.append(traffic.summary())
    return "\n".join(rows)
