"""Loop metrics through `ray.util.metrics` (exported by Ray's Prometheus endpoint on each node).

Invariant: recorded from one place (the driver's progress loop, from the learner's status and the
bridge's counters; the traffic's stay time through `record_arm`), so each number has one writer and
the progress line shows the same values.

Ray's endpoint (`ray.nodes()[i]["MetricsExportPort"]`, or the port given to
`ray start --metrics-export-port`) serves every metric with the prefix `ray_`: `onerec_learner_version`
is scraped as `ray_onerec_learner_version`, with Ray's own labels (SessionName, NodeAddress, ...) on top
of ours, and a counter whose name does not end in `_total` gets the suffix (`onerec_drift_alerts` is
scraped as `ray_onerec_drift_alerts_total`). infra/prometheus/prometheus.yml scrapes it;
infra/grafana/onerec.json charts it.
`exported_metric_names()` lists every name this module and the drift monitor export (the dashboard's
test checks its queries against it).
"""
from __future__ import annotations

import math
import time

from ray.util.metrics import Counter, Gauge, Histogram


class LoopMetrics:
    def __init__(self) -> None:
        self.version = Gauge("onerec_learner_version", description="latest published weight version")
        self.version_lag = Gauge("onerec_replica_version_lag", tag_keys=("replica",),
                                 description="published version minus the version the replica serves")
        self.since_publish = Gauge("onerec_seconds_since_publish", description="seconds since the last weight push")
        self.samples_per_s = Gauge("onerec_learner_samples_per_second", description="samples trained per second")
        self.loss = Gauge("onerec_learner_loss", tag_keys=("term",), description="last step's loss terms")
        self.requests = Counter("onerec_bridge_requests_total", description="recommendations served")
        self.request_errors = Counter("onerec_bridge_errors_total", description="requests answered with 5xx")
        self.latency = Histogram("onerec_bridge_latency_ms", boundaries=[2, 5, 10, 20, 50, 100, 200, 500, 1000],
                                 description="bridge latency per request (replica call + impression send)")
        self.positive_share = Gauge("onerec_positive_share", tag_keys=("served_version",),
                                    description="share of fed-back items with A = +1, per serving version")
        self.dislike_share = Gauge("onerec_dislike_share", tag_keys=("served_version",),
                                   description="share of fed-back items disliked, per serving version")
        self.stay_time = Gauge("onerec_stay_time_s", tag_keys=("arm",),
                               description="simulated users' stay time so far, seconds per user-day, per arm")
        self.arm_version = Gauge("onerec_arm_version", tag_keys=("arm",),
                                 description="latest published weight version of an arm's learner")
        self._requests_seen = 0
        self._errors_seen = 0
        self._latencies_seen = 0

    def record(self, status: dict, bridge) -> None:
        version = int(status["version"])
        self.version.set(version)
        for replica, served in status.get("replica_versions", {}).items():
            self.version_lag.set(max(version - served, 0), tags={"replica": replica[:8]})
        if status.get("published_at"):
            self.since_publish.set(time.time() - status["published_at"])
        self.samples_per_s.set(status.get("samples_per_s", 0.0))
        for term, value in status.get("losses", {}).items():
            self.loss.set(value, tags={"term": term})
        for served_version, c in status.get("by_version", {}).items():
            if c.get("feedback"):
                tags = {"served_version": str(served_version)}
                self.positive_share.set(c["positives"] / c["feedback"], tags=tags)
                self.dislike_share.set(c["dislikes"] / c["feedback"], tags=tags)
        if bridge is not None:
            if bridge.requests > self._requests_seen:
                self.requests.inc(bridge.requests - self._requests_seen)
                self._requests_seen = bridge.requests
            if bridge.errors > self._errors_seen:
                self.request_errors.inc(bridge.errors - self._errors_seen)
                self._errors_seen = bridge.errors
            new = bridge.latencies_ms[self._latencies_seen:] if self._latencies_seen <= len(bridge.latencies_ms) else []
            for value in new:
                self.latency.observe(value)
            self._latencies_seen = len(bridge.latencies_ms)

    def record_arm(self, arm: str, stay_time_s_per_user_day: float | None, *, version: int | None = None) -> None:
        """One arm's stay time (the traffic's `stay_time_so_far(arm)`; None: nothing measured yet) and,
        when given, its learner's version. Call it from the progress loop, once per arm."""
        if not arm:
            raise ValueError("arm: must be a non-empty name")
        tags = {"arm": str(arm)}
        if stay_time_s_per_user_day is not None:
            value = float(stay_time_s_per_user_day)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"stay_time_s_per_user_day: must be finite and >= 0, got {stay_time_s_per_user_day!r}")
            self.stay_time.set(value, tags=tags)
        if version is not None:
            self.arm_version.set(int(version), tags=tags)

    def names(self) -> list[str]:
        """The names of the metrics this instance declared (as `ray.util.metrics` knows them)."""
        return [m.info["name"] for m in vars(self).values() if hasattr(m, "info")]


def exported_metric_names() -> set[str]:
    """Every metric name the loop exports (LoopMetrics' and the drift monitor's), without Ray's `ray_` prefix."""
    from actors.drift import EXPORTED

    loop = {"onerec_learner_version", "onerec_replica_version_lag", "onerec_seconds_since_publish",
            "onerec_learner_samples_per_second", "onerec_learner_loss", "onerec_bridge_requests_total",
            "onerec_bridge_errors_total", "onerec_bridge_latency_ms", "onerec_positive_share",
            "onerec_dislike_share", "onerec_stay_time_s", "onerec_arm_version"}
    return loop | {f"onerec_drift_{n}" for n in EXPORTED} | {"onerec_drift_entropy", "onerec_drift_alerts"}
