"""The drift monitor: per weight version, how the policy moved and how what it served was received.

Invariants:
- every version is compared with the last ACCEPTED version (one that raised no alert), so a bad
  version, or the re-publication of an old one after a rollback, is never the reference;
- a rollback is requested at most once per offending version and always to an older accepted version
  (the publisher re-publishes it under a NEW, higher version number: versions only go forward);
- every record is appended to the JSON-lines log before any rollback is requested.

Two kinds of records (one JSON object per line, `kind` says which):
- "probe", at each new version, on a fixed probe set of user contexts:
  `kl`          mean over probe users of KL(new || reference) of the next-item distribution, estimated
                from constrained beam search: each version's top-`probe_top_k` items with their
                log pi, renormalised over the list; an item missing from the other list gets eps
                (`learner.metrics.kl_from_logprobs`);
  `kl_level1`   the exact KL of the full first-level (s1) distributions;
  `entropy`     [H1, H2, H3]: entropy of each semantic-id level's distribution along the
                unconstrained greedy decode (H1 is the full s1 distribution);
  `invalid_share` share of probe users whose unconstrained greedy code names no item;
  `probe_coverage`, `probe_gini` of the beam's top-k over the probe set;
- "served", per model_version, every `served_window` samples (and on `flush()`): `n`,
  `positive_share` (q > `positive_q` and no dislike: the report's top-quartile positives),
  `dislike_share`, `mean_play_time_s`, `coverage` and `gini` of the exposed items over the
  catalogue, `cold_start_share` (exposed items that no earlier sample contained: not yet trained on).
  `distinct_share` (distinct exposed items per exposure: 1 = every exposure a different item).
Alerts: `kl > kl_threshold` (probe), `dislike_share > dislike_threshold` with at least
`min_served` samples (served), or collapse: `collapse_versions` served records in a row with
`distinct_share < collapse_distinct_share` or `gini > collapse_gini`: a WARNING log line, the `onerec_drift_alerts` counter, `alerts` in
the record, and, when `rollback` is on, `on_rollback(to_version)`.

`DriftMonitor` is the plain class; `DriftMonitorActor` its Ray wrapper, which receives weights exactly
like a serving replica (`apply_weights(version, packed, checksum)`, so the WeightPublisher can push
to it) and asks `rollback_target.rollback.remote(to_version)` to roll serving back.
`onerec drift [LOG]` prints the table and writes the PNG plot.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from actors.config import DriftConfig
from learner import metrics
from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.tokenizer import SemanticTokenizer

log = logging.getLogger(__name__)

KEEP_ACCEPTED = 8  # accepted versions remembered as references / rollback targets


class _Exporter:
    """The drift gauges in ray.util.metrics (Prometheus / the Ray dashboard see them)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge

        names = ("kl", "kl_level1", "invalid_share", "probe_coverage", "probe_gini", "positive_share",
                 "dislike_share", "mean_play_time_s", "coverage", "gini", "cold_start_share", "version")
        self.gauges = {n: Gauge(f"onerec_drift_{n}", description=f"drift monitor: {n}") for n in names}
        self.entropy = Gauge("onerec_drift_entropy", description="entropy of a semantic-id level (nats)",
                             tag_keys=("level",))
        self.alerts = RayCounter("onerec_drift_alerts", description="drift alerts raised", tag_keys=("kind",))

    def export(self, record: dict) -> None:
        for name, gauge in self.gauges.items():
            value = record.get(name)
            if isinstance(value, (int, float)) and np.isfinite(value):
                gauge.set(float(value))
        for level, h in enumerate(record.get("entropy") or [], start=1):
            self.entropy.set(float(h), tags={"level": str(level)})
        for alert in record.get("alerts", []):
            self.alerts.inc(1.0, tags={"kind": alert["kind"]})


class DriftMonitor:
    """Computes the drift records; see the module docstring for what each number means."""

    def __init__(self, model_cfg: ModelConfig, tokenizer: SemanticTokenizer, probe_contexts: list[dict],
                 cfg: DriftConfig | None = None, *, trained_items=(),
                 on_rollback: Callable[[int], object] | None = None,
                 export_metrics: bool = False, device: str = "cpu"):
        if not probe_contexts:
            raise ValueError("probe_contexts: need at least one user context")
        self.cfg = cfg or DriftConfig()
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.trie = tokenizer.trie()
        self.catalogue_size = len(tokenizer)
        self._collapsed_run = 0          # served records in a row that looked collapsed
        self.device = torch.device(device)
        self.model = LazyDecoder(model_cfg).to(self.device).eval()
        self.probe = build_context_batch(probe_contexts, tokenizer, model_cfg)  # validated once
        self.on_rollback = on_rollback
        self.trained_items: set[int] = {int(v) for v in trained_items}
        self.exporter = _Exporter() if export_metrics else None
        self._probes: dict[int, dict] = {}     # accepted version -> its probe outputs
        self.accepted_versions: list[int] = []  # oldest first; the last one is the reference
        self.rolled_back_from: set[int] = set()
        self.latest_version = 0
        self._served: dict[int, list[dict]] = defaultdict(list)
        Path(self.cfg.log_path).parent.mkdir(parents=True, exist_ok=True)

    # ---- versions ------------------------------------------------------------------------------
    def on_weights(self, version: int, state_dict: dict[str, torch.Tensor]) -> dict:
        """Probe a new version; alert (and maybe roll back) when it moved too far from the reference."""
        version = int(version)
        if version <= self.latest_version:
            raise ValueError(f"weights version {version} is not newer than {self.latest_version}")
        self.model.load_state_dict(state_dict, strict=True)
        self.latest_version = version
        probe = self._probe()
        ref_version = self.reference_version()
        record = {"kind": "probe", "version": version, "ts": time.time(), "reference_version": ref_version,
                  "kl": None, "kl_level1": None, "entropy": probe["entropy"],
                  "invalid_share": probe["invalid_share"], "probe_coverage": probe["coverage"],
                  "probe_gini": probe["gini"], "alerts": [], "rolled_back_to": None}
        if ref_version is not None:
            ref = self._probes[ref_version]
            record["kl"] = float(np.mean([
                metrics.kl_from_logprobs(ids, lp, rids, rlp, eps=self.cfg.kl_eps)
                for ids, lp, rids, rlp in zip(probe["item_ids"], probe["logprobs"], ref["item_ids"], ref["logprobs"])]))
            record["kl_level1"] = float(np.mean(metrics.kl_divergence(probe["level1"], ref["level1"])))
            if record["kl"] > self.cfg.kl_threshold:
                record["alerts"].append({"kind": "kl", "value": record["kl"], "threshold": self.cfg.kl_threshold})
        if not record["alerts"]:
            self._probes[version] = probe
            self.accepted_versions.append(version)
            for old in self.accepted_versions[:-KEEP_ACCEPTED]:
                self._probes.pop(old, None)
            del self.accepted_versions[:-KEEP_ACCEPTED]
        self._finish(record)
        return record

    @torch.no_grad()
    def _probe(self) -> dict:
        ctx = self.probe.to(self.device)
        recs = beam_search(self.model, ctx, self.trie, beam_width=self.cfg.probe_beam_width,
                           top_k=min(self.cfg.probe_top_k, self.trie.n_items))
        # unconstrained greedy decode, one level at a time through teacher forcing on the prefix
        codes = torch.zeros(len(ctx), 3, dtype=torch.long, device=self.device)
        entropies, level1 = [], None
        for level in range(3):
            logp = self.model(ctx, codes)[:, level].float().log_softmax(-1)     # (B, K)
            p = logp.exp()
            entropies.append(float(-(p * logp).sum(-1).mean()))
            if level == 0:
                level1 = p.cpu().numpy()
            codes[:, level] = logp.argmax(-1)
        items = self.tokenizer.item_for_code(codes.cpu().numpy())
        top = recs.item_ids.cpu().numpy()
        exposure = np.bincount(np.searchsorted(np.sort(self.tokenizer.item_ids), top.reshape(-1)),
                               minlength=self.catalogue_size)
        return {"item_ids": top.tolist(), "logprobs": recs.logprobs.cpu().numpy().tolist(), "level1": level1,
                "entropy": entropies, "invalid_share": float(np.mean(items < 0)),
                "coverage": metrics.coverage(top, self.catalogue_size), "gini": metrics.gini(exposure)}

    # ---- what was served -------------------------------------------------------------------------
    def observe_samples(self, samples: list[dict]) -> list[dict]:
        """Take joined samples (the `samples` topic's dicts); emit a served record per full window."""
        records = []
        for s in samples:
            version = int(s["model_version"])
            self._served[version].append(s)
            if len(self._served[version]) >= self.cfg.served_window:
                records.append(self._served_record(version, self._served.pop(version)))
        return records

    def flush(self) -> list[dict]:
        """Served records for every partial window (call at shutdown and before reading the log)."""
        return [self._served_record(v, self._served.pop(v)) for v in sorted(self._served)]

    def _served_record(self, version: int, samples: list[dict]) -> dict:
        with_feedback = [s for s in samples if s.get("feedback")]
        dislike = np.array([bool(s["feedback"].get("dislike")) for s in with_feedback], dtype=bool)
        play = np.array([float(s["feedback"].get("play_time_s", 0.0)) for s in with_feedback])
        q = np.array([np.nan if s.get("q") is None else float(s["q"]) for s in with_feedback])
        items = np.array([int(s["item_id"]) for s in samples], dtype=np.int64)
        cold = np.array([int(v) not in self.trained_items for v in items])
        self.trained_items.update(items.tolist())
        exposed = np.unique(items, return_counts=True)[1]
        counts = np.concatenate([exposed, np.zeros(max(0, self.catalogue_size - len(exposed)))])  # (catalogue,)
        n = len(with_feedback)
        record = {"kind": "served", "version": version, "ts": time.time(), "n": len(samples), "n_feedback": n,
                  "positive_share": float(np.mean((np.nan_to_num(q) > self.cfg.positive_q) & ~dislike)) if n else None,
                  "dislike_share": float(dislike.mean()) if n else None,
                  "mean_play_time_s": float(play.mean()) if n else None,
                  "coverage": metrics.coverage(items, self.catalogue_size), "gini": metrics.gini(counts),
                  "cold_start_share": float(cold.mean()), "distinct_share": len(exposed) / max(len(samples), 1),
                  "alerts": [], "rolled_back_to": None}
        self._check_collapse(record)
        if n >= self.cfg.min_served and record["dislike_share"] > self.cfg.dislike_threshold:
            record["alerts"].append({"kind": "dislike", "value": record["dislike_share"],
                                     "threshold": self.cfg.dislike_threshold})
            if version in self.accepted_versions:
                # it served badly: no longer a reference (nor a rollback target)
                self.accepted_versions.remove(version)
                self._probes.pop(version, None)
        self._finish(record)
        return record

    def _check_collapse(self, record: dict) -> None:
        """Collapse: `collapse_versions` served records in a row with few distinct items per exposure
        (`distinct_share`) or a near-1 Gini of exposure over the catalogue. Windows smaller than
        `min_served` do not count (a few samples say nothing about the spread)."""
        if record["n"] < self.cfg.min_served:
            return
        collapsed = (record["distinct_share"] < self.cfg.collapse_distinct_share
                     or record["gini"] > self.cfg.collapse_gini)
        self._collapsed_run = self._collapsed_run + 1 if collapsed else 0
        if self._collapsed_run >= self.cfg.collapse_versions:
            record["alerts"].append({"kind": "collapse", "value": record["distinct_share"],
                                     "threshold": self.cfg.collapse_distinct_share,
                                     "gini": record["gini"], "consecutive": self._collapsed_run})

    def reference_version(self) -> int | None:
        return self.accepted_versions[-1] if self.accepted_versions else None

    # ---- alerts, log, rollback ---------------------------------------------------------------------
    def _finish(self, record: dict) -> None:
        version = record["version"]
        target = None
        if record["alerts"]:
            for alert in record["alerts"]:
                log.warning("drift alert: version %d %s = %.4f > %.4f", version, alert["kind"], alert["value"],
                            alert["threshold"])
            older = [v for v in self.accepted_versions if v < version]
            if self.cfg.rollback and older and version not in self.rolled_back_from and version == self.latest_version:
                target = older[-1]
                record["rolled_back_to"] = target
                self.rolled_back_from.add(version)
        with open(self.cfg.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.exporter is not None:
            self.exporter.export(record)
        if target is not None and self.on_rollback is not None:
            log.warning("drift: rolling serving back from version %d to version %d", version, target)
            self.on_rollback(target)


@ray.remote(max_concurrency=2)
class DriftMonitorActor:
    """Ray wrapper: receives versions like a replica; rollbacks go to `rollback_target.rollback(to_version)`."""

    def __init__(self, model_cfg: ModelConfig, tokenizer_bytes: bytes, probe_contexts: list[dict],
                 cfg: DriftConfig | None = None, *, trained_items=(), rollback_target=None, torch_threads: int = 1):
        from actors.publisher import checksum_of, unpack_weights

        torch.set_num_threads(torch_threads)
        self._checksum_of, self._unpack = checksum_of, unpack_weights
        self.rollback_target = rollback_target
        self.rollbacks: list[int] = []
        self.monitor = DriftMonitor(model_cfg, SemanticTokenizer.load(io.BytesIO(tokenizer_bytes)), probe_contexts,
                                    cfg, trained_items=trained_items, on_rollback=self._rollback,
                                    export_metrics=True)

    def _rollback(self, to_version: int) -> None:
        self.rollbacks.append(int(to_version))
        if self.rollback_target is not None:
            self.rollback_target.rollback.remote(int(to_version))  # fire and forget: the publisher acts on it

    def apply_weights(self, version: int, weights: np.ndarray, checksum: int) -> int:
        """Same contract as ReplicaActor.apply_weights, so the WeightPublisher can push to the monitor."""
        actual = self._checksum_of(weights)
        if actual != int(checksum):
            raise ValueError(f"weights version {version}: checksum mismatch ({actual:#010x} != {int(checksum):#010x})")
        tensors = {k: v.clone() for k, v in self._unpack(weights).items()}
        self.monitor.on_weights(int(version), tensors)
        return int(version)

    def version(self) -> int:
        return self.monitor.latest_version

    def observe_samples(self, samples: list[dict]) -> list[dict]:
        return self.monitor.observe_samples(samples)

    def flush(self) -> list[dict]:
        return self.monitor.flush()

    def rollbacks_requested(self) -> list[int]:
        return list(self.rollbacks)

    def health(self) -> dict:
        return {"version": self.monitor.latest_version, "reference_version": self.monitor.reference_version(),
                "rollbacks": list(self.rollbacks)}


# ---------------------------------------------------------------------------------------------- CLI
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


PROBE_KEYS = ("kl", "kl_level1", "entropy", "invalid_share", "probe_coverage", "probe_gini")


def drift_table(records: list[dict]) -> list[dict]:
    """One row per version: its probe record merged with the sample-weighted mean of its served records."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(int(r["version"]), {"version": int(r["version"]), "alerts": [], "rolled_back_to": None})
        row["alerts"] += [a["kind"] for a in r.get("alerts", [])]
        row["rolled_back_to"] = r.get("rolled_back_to") or row["rolled_back_to"]
        if r["kind"] == "probe":
            row.update({k: r[k] for k in PROBE_KEYS})
        elif r["kind"] == "served":
            row.setdefault("_served", []).append(r)
    for row in rows.values():
        served = row.pop("_served", [])
        if served:
            weights = np.array([max(s.get("n_feedback", s["n"]), 0) for s in served], dtype=float)
            row["n"] = int(sum(s["n"] for s in served))
            for key in ("positive_share", "dislike_share", "mean_play_time_s", "coverage", "gini", "cold_start_share"):
                vals = [(s[key], w) for s, w in zip(served, weights) if s.get(key) is not None]
                row[key] = (float(np.average([v for v, _ in vals], weights=[max(w, 1e-9) for _, w in vals]))
                            if vals else None)
    return [rows[v] for v in sorted(rows)]


COLUMNS = (("version", "{:>7d}"), ("kl", "{:>7.3f}"), ("kl_level1", "{:>7.3f}"), ("entropy", None),
           ("invalid_share", "{:>7.3f}"), ("coverage", "{:>7.3f}"), ("gini", "{:>6.3f}"),
           ("cold_start_share", "{:>6.3f}"), ("positive_share", "{:>6.3f}"), ("dislike_share", "{:>7.4f}"),
           ("mean_play_time_s", "{:>7.2f}"), ("n", "{:>6d}"))
HEADERS = ("version", "KL", "KL_s1", "H1/H2/H3", "invalid", "cover", "gini", "cold", "pos", "dislike", "play_s", "n")


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
    for level in range(3):
        axes[0, 1].plot(versions, [np.nan if not r.get("entropy") else r["entropy"][level] for r in rows],
                        marker=".", label=f"H level {level + 1}")
    axes[0, 1].plot(versions, series("invalid_share"), marker="x", label="invalid share")
    for key in ("coverage", "gini", "cold_start_share", "probe_coverage"):
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

