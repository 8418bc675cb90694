"""Prometheus and Grafana: the loop's gauges read back from Ray's real metrics endpoint over HTTP,
and the shipped dashboard and scrape config query only what the loop exports.

The integration test runs the closed loop (broker, join worker, learner, 2 replicas, bridge, drift
monitor, simulated users) for about a minute on the session's Ray, scrapes
`http://127.0.0.1:<MetricsExportPort>/metrics` and checks every `ray_onerec_*` series.
"""
import asyncio
import json
import math
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from actors.config import DriftConfig
from actors.metrics import LoopMetrics, exported_metric_names

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "infra" / "grafana" / "onerec.json"
SCRAPE_CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"
RAY_PREFIX = "ray_"                     # Ray's endpoint prefixes every application metric
SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SUFFIXES = ("_bucket", "_sum", "_count", "_total")   # histogram series; a counter not named *_total gets one


def metric_family(name: str) -> str:
    """`ray_onerec_bridge_latency_ms_bucket` -> `onerec_bridge_latency_ms` (our name, without Ray's prefix)."""
    name = name.removeprefix(RAY_PREFIX)
    if name in exported_metric_names():
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in exported_metric_names():
            return name[: -len(suffix)]
    return name


def dashboard_metric_names(dashboard: dict) -> set[str]:
    names = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names |= {metric_family(m) for m in re.findall(r"\bray_onerec_[a-z0-9_]+", target["expr"])}
    return names


def test_dashboard_is_valid_and_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat", "row"), panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    queried = dashboard_metric_names(dashboard)
    assert queried <= exported_metric_names(), f"not exported: {sorted(queried - exported_metric_names())}"
    # the panels the issue asks for: versions and lag, freshness, samples/s, losses, stay time, drift, collapse
    for needed in ("onerec_learner_version", "onerec_replica_version_lag", "onerec_seconds_since_publish",
                   "onerec_learner_samples_per_second", "onerec_learner_loss", "onerec_stay_time_s",
                   "onerec_drift_kl_k3_prev", "onerec_drift_kl_level1", "onerec_drift_entropy",
                   "onerec_drift_coverage", "onerec_drift_top_share", "onerec_drift_gini", "onerec_drift_alerts"):
        assert needed in queried, needed
    datasource = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert datasource and datasource[0]["query"] == "prometheus"


def test_scrape_config_targets_rays_endpoint():
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "onerec-ray"]
    assert job["metrics_path"] == "/metrics"
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert any(t.endswith(":8080") for c in job.get("static_configs", []) for t in c["targets"])
    assert config["global"]["scrape_interval"] in ("5s", "10s")


def test_loop_metrics_declare_exactly_the_exported_loop_names():
    declared = set(LoopMetrics().names())
    assert declared == {n for n in exported_metric_names() if not n.startswith("onerec_drift_")}
    with pytest.raises(ValueError, match="stay_time_s_per_user_day"):
        LoopMetrics().record_arm("sft", float("nan"))
    with pytest.raises(ValueError, match="arm"):
        LoopMetrics().record_arm("", 10.0)


# ---- the real endpoint -----------------------------------------------------------------------------------
def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """Our series on Ray's endpoint: family name -> [(labels, value)]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if not match or not match["name"].startswith(RAY_PREFIX + "onerec_"):
            continue
        labels = dict(LABEL.findall(match["labels"] or ""))
        out.setdefault(match["name"], []).append((labels, float(match["value"])))
    return out


def latest(series: dict, name: str, **labels) -> list[float]:
    return [v for tags, v in series.get(RAY_PREFIX + name, []) if all(tags.get(k) == x for k, x in labels.items())]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_loop_gauges_are_scraped_from_rays_prometheus_endpoint(tmp_path, ray_session, stream_config):
    from actors.driver import Loop
    from tests.loop_helpers import loop_config

    ray = ray_session
    port = int(ray.nodes()[0]["MetricsExportPort"])
    cfg = loop_config(tmp_path, micro_batch=16, publish_every_steps=2, publish_every_s=1.0, checkpoint_every_steps=50,
                      progress_every_s=1.0, serve={"bridge_port": 0, "request_timeout_s": 10.0})
    cfg.simulator.users = 50
    cfg.simulator.concurrency = 3
    cfg.drift = DriftConfig(log_path=str(tmp_path / "drift.jsonl"), served_window=24, min_served=8, kl_min_samples=8)
    cfg.stream = stream_config
    cfg.stream.idle_close_s = 1.0
    loop = Loop(cfg, log_dir=str(tmp_path / "logs"), manage_ray=False)
    required = {"onerec_learner_version", "onerec_replica_version_lag", "onerec_seconds_since_publish",
                "onerec_learner_samples_per_second", "onerec_learner_loss", "onerec_bridge_requests_total",
                "onerec_bridge_latency_ms", "onerec_stay_time_s", "onerec_arm_version",
                "onerec_drift_version", "onerec_drift_kl", "onerec_drift_kl_level1", "onerec_drift_kl_k3_prev",
                "onerec_drift_kl_k1_prev", "onerec_drift_entropy", "onerec_drift_coverage", "onerec_drift_gini",
                "onerec_drift_top_share", "onerec_drift_distinct_share", "onerec_drift_cold_start_share"}

    async def scenario() -> tuple[dict, dict]:
        await loop.start()
        try:
            first, present = None, set()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                await asyncio.sleep(3.0)
                # the stay time comes from the traffic: recorded here as the progress loop will
                status = loop.primary.last_status
                stay = loop.traffic.stay_time_so_far(None)
                if stay is not None:
                    loop.metrics.record_arm(loop.primary.name, stay, version=status.get("version"))
                series = await asyncio.to_thread(scrape, port)
                present = {metric_family(n) for n in series}
                versions = latest(series, "onerec_learner_version")
                if first is None and versions and max(versions) >= 1:
                    first = series
                if (first is not None and required <= present and latest(series, "onerec_learner_samples_per_second")
                        and max(latest(series, "onerec_learner_samples_per_second")) > 0
                        and max(versions) > max(latest(first, "onerec_learner_version"))):
                    return first, series
            missing = sorted(required - present)
            raise AssertionError(f"timed out: series missing from the endpoint: {missing}")
        finally:
            await loop.stop()

    first, series = asyncio.run(scenario())
    families = {metric_family(name) for name in series}
    assert families <= exported_metric_names(), f"unknown onerec series: {sorted(families - exported_metric_names())}"
    for name, rows in series.items():                     # every series has a sane (finite) value
        assert rows and all(math.isfinite(v) for _, v in rows), name
    assert max(latest(series, "onerec_learner_version")) > max(latest(first, "onerec_learner_version"))
    lags = latest(series, "onerec_replica_version_lag")
    assert lags and all(0 <= lag < 50 for lag in lags)
    assert 0 <= max(latest(series, "onerec_seconds_since_publish")) < 60
    assert max(latest(series, "onerec_learner_samples_per_second")) > 0
    assert all(math.isfinite(v) for v in latest(series, "onerec_learner_loss"))
    assert max(latest(series, "onerec_stay_time_s", arm=loop.primary.name)) > 0
    assert max(latest(series, "onerec_drift_version")) >= 1
    levels = {tags["level"] for tags, _ in series[RAY_PREFIX + "onerec_drift_entropy"]}
    assert levels == {"1", "2", "3"}
    assert all(0 <= v <= 1 for v in latest(series, "onerec_drift_coverage") + latest(series, "onerec_drift_top_share"))
