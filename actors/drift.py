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
  `kl_level1`   the exact KL(new || reference) of the full first-level (s1) distributions;
  `kl_k1_prev`, `kl_k3_prev` (with `kl_prev_version`, `kl_prev_n`): KL(pi_old || pi_new) estimated
                from the items that pi_old = the newest accepted version with >= `kl_min_samples`
                buffered served samples actually served, scored by the new version on their own
                contexts (actors/drift_signals.py: k1 = -log r, k3 = (r - 1) - log r, r = pi_new / pi_old);
  `kl_k1_ref`, `kl_k3_ref` (`kl_ref_version`, `kl_ref_n`): the same against the OLDEST accepted
                version still kept (up to KEEP_ACCEPTED back): the drift accumulated over versions;
  `entropy`     [H1, H2, H3]: entropy of each semantic-id level's distribution along the
                unconstrained greedy decode (H1 is the full s1 distribution);
  `invalid_share` share of probe users whose unconstrained greedy code names no item;
  `probe_coverage`, `probe_gini` of the beam's top-k over the probe set;
- "served", per model_version, every `served_window` samples of source "onerec" (and on `flush()`): `n`,
  `positive_share` (q > `positive_q` and no dislike: the report's top-quartile positives),
  `dislike_share`, `mean_play_time_s`, `coverage` and `gini` of the exposed items over the
  catalogue, `cold_start_share` (exposed items that no earlier sample contained: not yet trained on),
  `distinct_share` (distinct exposed items per exposure: 1 = every exposure a different item),
  `top_share` (share of requests whose top item is one of the window's `top_n` most served items).
Alerts (thresholds in `[drift]`, actors/config.py; the kind is the alert's `kind`):
  probe:  `kl` > kl_threshold, `kl_level1` > kl_level1_threshold, `k1_prev` / `k1_ref` (and, where
          their thresholds are set, `k3_prev` / `k3_ref`) above theirs, `entropy` (any level) < entropy_min;
  served (windows of >= `min_served` samples): `dislike` > dislike_threshold; `cold_start` >
          cold_start_max once `cold_start_after` samples were seen; and for `collapse_versions`
          windows in a row: `collapse` (distinct_share < collapse_distinct_share or gini > collapse_gini),
          `coverage` < coverage_min, `top_share` > top_share_max.
k1 and k3 estimate the same KL when x ~ pi_old; the served items are drawn from the beam (q = pi_old
renormalised over the beam), where E_q[k1] = KL(q || pi_new) - KL(q || pi_old) still holds exactly (the
beam's mass cancels) but E_q[r] != 1 biases k3 upwards without bound: k1 alerts, k3 (off by default)
only where its threshold is set (actors/config.py says what a healthy loop measured).
An alert is a WARNING log line, the `onerec_drift_alerts` counter, `alerts` in the record, and, when
`rollback` is on, `on_rollback(to_version)`.

`DriftMonitor` is the plain class; `DriftMonitorActor` its Ray wrapper, which receives weights exactly
like a serving replica (`apply_weights(version, packed, checksum)`, so the WeightPublisher can push
to it) and asks `rollback_target.rollback.remote(to_version)` to roll serving back.
`onerec drift [LOG]` prints the table and writes the PNG plot (actors/drift_report.py).
"""
from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from actors.config import DriftConfig
from actors.drift_report import (add_arguments, drift_table, format_table, main, plot_drift,  # noqa: F401
                                  read_drift_log)  # `onerec drift` and the tests import them from here
from actors.drift_signals import ServedSampleBuffer, kl_estimators, score_logprobs, top_item_share
from learner import metrics
from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.tokenizer import SemanticTokenizer

log = logging.getLogger(__name__)

KEEP_ACCEPTED = 8  # accepted versions remembered as references / rollback targets
EXPORTED = ("kl", "kl_level1", "kl_k1_prev", "kl_k3_prev", "kl_k1_ref", "kl_k3_ref", "invalid_share",
            "probe_coverage", "probe_gini", "positive_share", "dislike_share", "mean_play_time_s", "coverage",
            "gini", "cold_start_share", "distinct_share", "top_share", "version")
# what the served-window checks compare: kind -> (record key, config threshold, alert when value is ...)
RUN_CHECKS = (("coverage", "coverage", "coverage_min", "below"), ("top_share", "top_share", "top_share_max", "above"))


class _Exporter:
    """The drift gauges in ray.util.metrics (Prometheus sees them as ray_onerec_drift_*)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge

        self.gauges = {n: Gauge(f"onerec_drift_{n}", description=f"drift monitor: {n}") for n in EXPORTED}
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


def _alert(kind: str, value: float, threshold: float, **extra) -> dict:
    return {"kind": kind, "value": float(value), "threshold": float(threshold), **extra}


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
        self._runs: dict[str, int] = defaultdict(int)   # served-window check -> failing windows in a row
        self.device = torch.device(device)
        self.model = LazyDecoder(model_cfg).to(self.device).eval()
        self.probe = build_context_batch(probe_contexts, tokenizer, model_cfg)  # validated once
        self.on_rollback = on_rollback
        self.trained_items: set[int] = {int(v) for v in trained_items}
        self.samples_seen = 0
        self.exporter = _Exporter() if export_metrics else None
        self._probes: dict[int, dict] = {}     # accepted version -> its probe outputs
        self.accepted_versions: list[int] = []  # oldest first; the last one is the reference
        self.rolled_back_from: set[int] = set()
        self.latest_version = 0
        self._served: dict[int, list[dict]] = defaultdict(list)
        self.served_buffer = ServedSampleBuffer(self.cfg.kl_samples, 4 * KEEP_ACCEPTED)
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
        record.update(self._served_kl(version))
        self._check_probe(record)
        if not record["alerts"]:
            self._probes[version] = probe
            self.accepted_versions.append(version)
            for old in self.accepted_versions[:-KEEP_ACCEPTED]:
                self._probes.pop(old, None)
            del self.accepted_versions[:-KEEP_ACCEPTED]
        self._finish(record)
        return record

    def _served_kl(self, version: int) -> dict:
        """k1 / k3 estimates of KL(pi_old || pi_new) against the previous and the reference version."""
        out, estimates = {}, {}
        usable = [v for v in self.accepted_versions
                  if v < version and self.served_buffer.count(v) >= self.cfg.kl_min_samples]
        for name, old in (("prev", usable[-1] if usable else None), ("ref", usable[0] if usable else None)):
            out.update({f"kl_k1_{name}": None, f"kl_k3_{name}": None, f"kl_{name}_version": old, f"kl_{name}_n": 0})
            if old is None:
                continue
            if old not in estimates:          # one version both previous and reference: scored once
                samples = self.served_buffer.samples(old)
                logp_new = score_logprobs(self.model, samples, self.tokenizer, self.model_cfg,
                                          batch=self.cfg.kl_batch, device=self.device)
                estimates[old] = kl_estimators([s["logprob"] for s in samples], logp_new)
            est = estimates[old]
            out.update({f"kl_k1_{name}": est["k1"], f"kl_k3_{name}": est["k3"], f"kl_{name}_n": est["n"]})
        return out

    def _check_probe(self, record: dict) -> None:
        cfg, alerts = self.cfg, record["alerts"]
        for kind, key, threshold in (("kl", "kl", cfg.kl_threshold), ("kl_level1", "kl_level1", cfg.kl_level1_threshold),
                                     ("k1_prev", "kl_k1_prev", cfg.kl_k1_prev_threshold),
                                     ("k1_ref", "kl_k1_ref", cfg.kl_k1_ref_threshold),
                                     ("k3_prev", "kl_k3_prev", cfg.kl_k3_prev_threshold),
                                     ("k3_ref", "kl_k3_ref", cfg.kl_k3_ref_threshold)):
            if record.get(key) is not None and record[key] > threshold:
                alerts.append(_alert(kind, record[key], threshold))
        lowest = min(range(3), key=lambda level: record["entropy"][level])
        if record["entropy"][lowest] < cfg.entropy_min:
            alerts.append(_alert("entropy", record["entropy"][lowest], cfg.entropy_min, level=lowest + 1))

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
        """Take joined samples (the `samples` topic's dicts); emit a served record per full window.
        Samples of other pipelines (source "legacy": the popularity baseline) say nothing about the
        policy and are left out."""
        records = []
        for s in samples:
            if s.get("source", "onerec") != "onerec":
                continue
            version = int(s["model_version"])
            self._served[version].append(s)
            self.served_buffer.add(s)
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
        self.samples_seen += len(samples)
        exposed = np.unique(items, return_counts=True)[1]
        counts = np.concatenate([exposed, np.zeros(max(0, self.catalogue_size - len(exposed)))])  # (catalogue,)
        n = len(with_feedback)
        record = {"kind": "served", "version": version, "ts": time.time(), "n": len(samples), "n_feedback": n,
                  "positive_share": float(np.mean((np.nan_to_num(q) > self.cfg.positive_q) & ~dislike)) if n else None,
                  "dislike_share": float(dislike.mean()) if n else None,
                  "mean_play_time_s": float(play.mean()) if n else None,
                  "coverage": metrics.coverage(items, self.catalogue_size), "gini": metrics.gini(counts),
                  "cold_start_share": float(cold.mean()), "distinct_share": len(exposed) / max(len(samples), 1),
                  "top_share": top_item_share([s.get("request_id") for s in samples], items,
                                              [s.get("logprob") for s in samples], self.cfg.top_n),
                  "alerts": [], "rolled_back_to": None}
        if record["n"] >= self.cfg.min_served:    # a few samples say nothing about the spread
            self._check_collapse(record)
            self._check_served(record, n)
        if any(a["kind"] == "dislike" for a in record["alerts"]) and version in self.accepted_versions:
            # it served badly: no longer a reference (nor a rollback target)
            self.accepted_versions.remove(version)
            self._probes.pop(version, None)
        self._finish(record)
        return record

    def _check_served(self, record: dict, n_feedback: int) -> None:
        cfg = self.cfg
        if n_feedback >= cfg.min_served and record["dislike_share"] > cfg.dislike_threshold:
            record["alerts"].append(_alert("dislike", record["dislike_share"], cfg.dislike_threshold))
        warm = self.samples_seen - record["n"] >= cfg.cold_start_after
        if warm and record["cold_start_share"] > cfg.cold_start_max:
            record["alerts"].append(_alert("cold_start", record["cold_start_share"], cfg.cold_start_max))
        for kind, key, threshold_name, side in RUN_CHECKS:
            value, threshold = record[key], getattr(cfg, threshold_name)
            failing = value is not None and (value < threshold if side == "below" else value > threshold)
            self._runs[kind] = self._runs[kind] + 1 if failing else 0
            if self._runs[kind] >= cfg.collapse_versions:
                record["alerts"].append(_alert(kind, value, threshold, consecutive=self._runs[kind]))

    def _check_collapse(self, record: dict) -> None:
        """Collapse: `collapse_versions` served records in a row with few distinct items per exposure
        (`distinct_share`) or a near-1 Gini of exposure over the catalogue."""
        collapsed = (record["distinct_share"] < self.cfg.collapse_distinct_share
                     or record["gini"] > self.cfg.collapse_gini)
        self._runs["collapse"] = self._runs["collapse"] + 1 if collapsed else 0
        if self._runs["collapse"] >= self.cfg.collapse_versions:
            record["alerts"].append(_alert("collapse", record["distinct_share"], self.cfg.collapse_distinct_share,
                                           gini=record["gini"], consecutive=self._runs["collapse"]))

    def reference_version(self) -> int | None:
        return self.accepted_versions[-1] if self.accepted_versions else None

    # ---- alerts, log, rollback ---------------------------------------------------------------------
    def _finish(self, record: dict) -> None:
        version = record["version"]
        target = None
        if record["alerts"]:
            for alert in record["alerts"]:
                log.warning("drift alert: version %d %s = %.4f (threshold %.4f)", version, alert["kind"],
                            alert["value"], alert["threshold"])
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
