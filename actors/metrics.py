"""Loop metrics through `ray.util.metrics` (exported by Ray's Prometheus endpoint on each node).

Invariant: recorded from one place (the driver's progress loop, from the learner's status and the
bridge's counters), so each number has one writer and the progress line shows the same values.
"""
from __future__ import annotations

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
