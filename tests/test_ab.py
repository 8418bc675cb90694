"""`onerec ab` end to end: arms under one World traffic through the real broker, join worker, Ray and bridge."""
import asyncio
import time

import pytest

from actors.ab import ab_report, format_report
from actors.arms import parse_arms
from actors.loop import Loop
from onerec import cli
from simulator.traffic import WorldTraffic
from tests.loop_helpers import loop_config


@pytest.mark.parametrize("arms, message", [("gbpo,gpbo,sft", "unknown arm 'gpbo'"), ("gbpo,ecpo", "`sft` arm")])
def test_a_bad_arm_list_stops_before_anything_starts(arms, message, capsys):
    start = time.monotonic()
    assert cli.main(["ab", "--arms", arms, "--duration", "5"]) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - start < 5          # no broker, no Ray, no worker was started


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_ab_run_tells_the_oracle_from_random(tmp_path, ray_session, stream_config):
    """The world can tell: in the same traffic, the oracle's users stay far longer than random's; the
    learned arm trains on its own samples and publishes versions that serve its users."""
    cfg = loop_config(tmp_path, micro_batch=16, publish_every_steps=3, publish_every_s=1.5, progress_every_s=10.0,
                      drift_monitor=False, serve={"bridge_port": 0, "request_timeout_s": 10.0})
    cfg.stream = stream_config
    cfg.stream.idle_close_s = 1.0
    cfg.simulator.users = 90
    cfg.simulator.concurrency = 4
    specs = parse_arms("sft,oracle,random", require_sft=True)
    names = [s.name for s in specs]
    loop = Loop(cfg, arms=specs, log_dir=str(tmp_path / "logs"), manage_ray=False,
                traffic_factory=lambda lp: WorldTraffic(lp.cfg, lp.url, arms=names, experiment=True))
    asyncio.run(loop.run(duration_s=60.0))
    report = ab_report(loop)
    print(format_report(report))
    arms = report["arms"]
    assert report["simulated_days"] > 0.5
    assert arms["oracle"]["stay_time"] > 1.5 * arms["random"]["stay_time"], arms
    lo, hi = report["diff_vs_sft"]["oracle"]["lo"], report["diff_vs_sft"]["random"]["hi"]
    assert lo > hi, "the oracle's interval against sft lies above random's"
    assert arms["sft"]["samples_trained"] > 0 and arms["sft"]["versions"] >= 2
    assert arms["sft"]["own_videos"] > 0 and loop.traffic.stats["requests"] > 0
    assert not loop.traffic.failures, loop.traffic.failures
    assert sum(a["users"] for a in arms.values()) == cfg.simulator.users
