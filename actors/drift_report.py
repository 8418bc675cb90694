"""`onerec drift [LOG]`: the drift monitor's JSON-lines log as a table per weight version and a PNG plot.

Invariant: reads the log only (never a live monitor); a line that is not JSON is named by its number.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

def read_drift_log(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {n}: not JSON ({exc.msg})") from None
    return records


PROBE_KEYS = ("kl", "kl_level1", "kl_k3_prev", "kl_k3_ref", "entropy", "invalid_share", "probe_coverage", "probe_gini")


def drift_table(records: list[dict]) -> list[dict]:
    """One row per version: its probe record merged with the sample-weighted mean of its served records."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(int(r["version"]), {"version": int(r["version"]), "alerts": [], "rolled_back_to": None})
        row["alerts"] += [a["kind"] for a in r.get("alerts", [])]
        row["rolled_back_to"] = r.get("rolled_back_to") or row["rolled_back_to"]
        if r["kind"] == "probe":
            row.update({k: r.get(k) for k in PROBE_KEYS})
        elif r["kind"] == "served":
            row.setdefault("_served", []).append(r)
    for row in rows.values():
        served = row.pop("_served", [])
        if served:
            weights = np.array([max(s.get("n_feedback", s["n"]), 0) for s in served], dtype=float)
            row["n"] = int(sum(s["n"] for s in served))
            for key in ("positive_share", "dislike_share", "mean_play_time_s", "coverage", "gini", "cold_start_share",
                        "top_share"):
                vals = [(s[key], w) for s, w in zip(served, weights) if s.get(key) is not None]
                row[key] = (float(np.average([v for v, _ in vals], weights=[max(w, 1e-9) for _, w in vals]))
                            if vals else None)
    return [rows[v] for v in sorted(rows)]


COLUMNS = (("version", "{:>7d}"), ("kl", "{:>7.3f}"), ("kl_level1", "{:>7.3f}"), ("kl_k3_prev", "{:>7.3f}"),
           ("kl_k3_ref", "{:>7.3f}"), ("entropy", None),
           ("invalid_share", "{:>7.3f}"), ("coverage", "{:>7.3f}"), ("gini", "{:>6.3f}"),
           ("cold_start_share", "{:>6.3f}"), ("top_share", "{:>6.3f}"), ("positive_share", "{:>6.3f}"), ("dislike_share", "{:>7.4f}"),
           ("mean_play_time_s", "{:>7.2f}"), ("n", "{:>6d}"))
HEADERS = ("version", "KL", "KL_s1", "k3_prev", "k3_ref", "H1/H2/H3", "invalid", "cover", "gini", "cold", "top_n",
           "pos", "dislike", "play_s", "n")


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{h:>7s}" if h != "H1/H2/H3" else f"{h:>14s}" for h in HEADERS) + "  alerts"]
    for row in rows:
        cells = []
        for (key, fmt), header in zip(COLUMNS, HEADERS):
            value = row.get(key)
            if key == "entropy":
                cells.append(f"{'/'.join(f'{h:.2f}' for h in value):>14s}" if value else f"{'-':>14s}")
            elif value is None:
                cells.append(f"{'-':>7s}")
            else:
                cells.append(fmt.format(value).rjust(7))
        alert = ",".join(row["alerts"])
        if row.get("rolled_back_to") is not None:
            alert += f" -> rolled back to {row['rolled_back_to']}"
        lines.append("  ".join(cells) + "  " + alert)
    return "\n".join(lines)


def plot_drift(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [r["version"] for r in rows]

    def series(key):
        return [np.nan if r.get(key) is None else r[key] for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    axes[0, 0].plot(versions, series("kl"), marker="o", label="KL(new || reference), top-k")
    axes[0, 0].plot(versions, series("kl_level1"), marker=".", label="KL level 1 (exact)")
    axes[0, 0].plot(versions, series("kl_k3_prev"), marker="+", label="k3 KL(old || new), served, vs previous")
    axes[0, 0].plot(versions, series("kl_k3_ref"), marker="x", label="k3 vs the oldest kept accepted")
    for level in range(3):
        axes[0, 1].plot(versions, [np.nan if not r.get("entropy") else r["entropy"][level] for r in rows],
                        marker=".", label=f"H level {level + 1}")
    axes[0, 1].plot(versions, series("invalid_share"), marker="x", label="invalid share")
    for key in ("coverage", "gini", "cold_start_share", "top_share", "probe_coverage"):
        axes[1, 0].plot(versions, series(key), marker=".", label=key)
    for key in ("positive_share", "dislike_share"):
        axes[1, 1].plot(versions, series(key), marker=".", label=key)
    ax2 = axes[1, 1].twinx()
    ax2.plot(versions, series("mean_play_time_s"), color="grey", linestyle="--", label="mean play (s)")
    ax2.set_ylabel("mean play time (s)")
    for r in rows:
        if r["alerts"]:
            for ax in axes.flat:
                ax.axvline(r["version"], color="red", alpha=0.3)
    for ax, title in zip(axes.flat, ("policy movement", "entropy / validity", "exposure", "what was served")):
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("weights version")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", nargs="?", default=None, help="drift JSON-lines log (default: drift.log_path)")
    parser.add_argument("--plot", default=None, help="PNG path (default: the log's path with .png)")
    parser.add_argument("--json", action="store_true", help="print the table rows as one JSON list")


def main(args: argparse.Namespace, cfg) -> int:
    args.log = args.log or cfg.drift.log_path
    try:
        rows = drift_table(read_drift_log(args.log))
    except (OSError, ValueError, KeyError) as exc:
        print(f"onerec drift: {args.log}: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"onerec drift: {args.log} has no records", file=sys.stderr)
        return 1
    plot_path = Path(args.plot) if args.plot else Path(args.log).with_suffix(".png")
    plot_drift(rows, plot_path)
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows))
    print(f"plot: {plot_path}", file=sys.stderr)
    return 0

