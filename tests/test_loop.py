"""The closed loop on CPU: broker, join worker, learner, 2 replicas, bridge and simulated users.

One test, about a minute and a half: the version advances and replicas serve it, impressions carry
logprobs and versions, samples are trained with a finite loss; a replica killed mid-traffic loses
no request; a learner killed mid-traffic comes back from its checkpoint; the stop leaves no process.
"""
import asyncio
import time

import numpy as np
import pytest
import ray
from kafka import KafkaConsumer

from actors.driver import Loop
from streaming import schemas
from streaming.topics import topic_name
from tests.loop_helpers import loop_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def read_impressions(stream_cfg, limit: int = 5000) -> list[dict]:
    consumer = KafkaConsumer(topic_name(stream_cfg, "impressions"), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000, **stream_cfg.client_options())
    try:
        out = []
        for record in consumer:
            out.append(schemas.decode_impression(record.value))
            if len(out) >= limit:
                break
        return out
    finally:
        consumer.close()


@pytest.mark.timeout(300)
def test_closed_loop(tmp_path, ray_session, stream_config):
    cfg = loop_config(tmp_path, micro_batch=16, publish_every_steps=3, publish_every_s=1.5,
                      checkpoint_every_steps=5, progress_every_s=5.0,
                      serve={"bridge_port": 0, "request_timeout_s": 10.0})
    cfg.simulator.users = 50
    cfg.simulator.concurrency = 3
    cfg.stream = stream_config
    cfg.stream.idle_close_s = 1.0
    loop = Loop(cfg, log_dir=str(tmp_path / "logs"), manage_ray=False)

    async def scenario():
        await loop.start()
        try:
            status = {}

            async def learner_status():
                return await asyncio.wait_for(loop.learner.status.remote(), 20)

            async def advanced():
                status.update(await learner_status())
                return status["version"] >= 4 and status["stats"].get("trained", 0) >= 64

            await wait_for(advanced, 120, "the learner to train and publish version 4")
            served = lambda: max(loop.traffic.by_version, default=0)   # noqa: E731
            await wait_for(lambda: _true(served() >= 3), 30, "answers from a version >= 3")
            assert status["stats"].get("nonfinite_steps", 0) == 0
            assert all(np.isfinite(v) for v in status["losses"].values())

            # a replica killed mid-traffic: no request is lost, and the supervisor replaces it
            before = dict(loop.traffic.failures)
            ray.kill(loop.replicas[0])
            requests_at_kill = loop.traffic.stats["requests"]
            await wait_for(lambda: _true(loop.traffic.stats["requests"] >= requests_at_kill + 40), 60,
                           "40 more requests after the replica was killed")
            errors = {k: v - before.get(k, 0) for k, v in loop.traffic.failures.items()}
            assert not any(errors.values()), f"requests failed after the kill: {errors}"
            await wait_for(lambda: _true(len(loop.bridge.pool) == 2), 60, "the replica to be replaced")

            # a rollback (what the drift monitor asks for) serves older weights under a newer version
            current = (await learner_status())["version"]
            rolled = await asyncio.wait_for(loop.learner.rollback.remote(current - 1), 30)
            assert rolled > current
            await wait_for(lambda: _true(max(loop.traffic.by_version) >= rolled), 30, "the rolled-back version served")

            # the learner killed mid-traffic restarts from its checkpoint, versions keep going forward
            version_before = (await learner_status())["version"]
            ray.kill(loop.learner)

            async def resumed():
                if loop.learner_restarts < 1:
                    return False
                try:
                    s = await learner_status()
                except (ray.exceptions.RayActorError, asyncio.TimeoutError):   # dead, or still starting
                    return False
                return s["resumed_from"] is not None and s["version"] > version_before
            await wait_for(resumed, 90, "the restarted learner to resume and publish")
            newest = max(loop.traffic.by_version)
            await wait_for(lambda: _true(max(loop.traffic.by_version) > newest), 30, "answers from a newer version")
        finally:
            await loop.stop()

    asyncio.run(scenario())

    impressions = read_impressions(cfg.stream)
    ours = [imp for imp in impressions if imp["source"] == "onerec"]
    legacy = [imp for imp in impressions if imp["source"] == "legacy"]
    assert ours and legacy, "both the policy and the legacy pipeline serve the simulated traffic"
    assert len(ours) + len(legacy) == len(impressions)
    for imp in ours:
        assert imp["model_version"] >= 1
        assert all(item["logprob"] is not None and item["logprob"] <= 0 for item in imp["items"])
        assert imp["context"]["short"]["item_id"] or imp["context"]["profile"]
    for imp in legacy:                       # other traffic: no pi_old, so GBPO uses sg(pi)
        assert all(item["logprob"] is None for item in imp["items"])
    assert len({imp["model_version"] for imp in ours}) >= 2
    assert loop.worker.poll() is not None, "the join worker is still running"


async def _true(value: bool) -> bool:
    return value
