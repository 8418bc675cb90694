"""The loop's freshness and the bridge's latency on the embedded default (one machine).

Prints ONE JSON object:
- `freshness_s`: median over probes of the time from sending a feedback event to the first answer
  served by a weight version whose training included that feedback's sample (feedback -> Faust
  join -> samples -> learner step -> publish -> replica swap -> served). Target < 10 s.
  `freshness_floor_s` is the join's feedback window (no sample can leave the join sooner).
- `bridge_p50_ms`, `bridge_p99_ms`, `requests_per_s`: a closed-loop HTTP load on POST /recommend
  (`--clients` concurrent clients, `--load-s` seconds) while the loop runs, measured at the client;
  `replica_p50_ms` / `replica_p99_ms`: the same requests sent straight to a replica actor in the
  same run (the baseline: what HTTP, validation and impression logging add).

    python bench/loop.py                  # ~2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time

import aiohttp
import numpy as np

from actors.driver import Loop
from infra.broker import free_port
from onerec.config import Config


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def probe_freshness(loop: Loop, session: aiohttp.ClientSession, user: int, timeout_s: float) -> float:
    async with session.post("/recommend", json={"user_id": user}) as resp:
        answer = await resp.json()
    request_id = answer["request_id"]
    sent_at = time.monotonic()
    await loop.traffic.watch(user, answer)          # the feedback for every shown item, now
    deadline = sent_at + timeout_s
    version = None
    while version is None:
        found = await loop.learner.version_for.remote([request_id])
        version = found.get(request_id)
        if version is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id} was not trained within {timeout_s} s")
            await asyncio.sleep(0.02)
    while True:
        async with session.post("/recommend", json={"user_id": user}) as resp:
            served = (await resp.json())["model_version"]
        if served >= version:
            return time.monotonic() - sent_at
        if time.monotonic() > deadline:
            raise TimeoutError(f"version {version} was not served within {timeout_s} s")
        await asyncio.sleep(0.02)


async def http_load(url: str, users: np.ndarray, *, clients: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    rng = np.random.default_rng(1)

    async def client(session):
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            async with session.post("/recommend", json={"user_id": int(rng.choice(users))}) as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append(1000 * (time.perf_counter() - start))

    async with aiohttp.ClientSession(url) as session:
        await asyncio.gather(*[client(session) for _ in range(clients)])
    return latencies, len(latencies)


async def replica_direct(loop: Loop, users: np.ndarray, *, n: int) -> list[float]:
    """Baseline: the same recommendation as one actor call, no HTTP, no Kafka."""
    handle = loop.bridge.pool.handles[0]
    latencies = []
    for i in range(n):
        context = loop.bridge.views.context(int(users[i % len(users)]))
        start = time.perf_counter()
        await handle.recommend.remote([context], loop.cfg.loop.top_k, loop.cfg.loop.beam_width)
        latencies.append(1000 * (time.perf_counter() - start))
    return latencies


async def bench(args) -> dict:
    cfg = Config.from_name("tiny")
    workdir = tempfile.mkdtemp(prefix="onerec-bench-loop-")
    cfg.stream.bootstrap_servers = f"127.0.0.1:{free_port()}"
    cfg.stream.namespace = "bench"
    cfg.loop.checkpoint_dir = f"{workdir}/checkpoints"
    cfg.loop.init_from = ""
    cfg.serve.bridge_port = 0
    cfg.loop.progress_every_s = 10.0
    loop = Loop(cfg, log_dir=f"{workdir}/logs", out=sys.stderr)
    await loop.start()
    try:
        await asyncio.sleep(args.warmup_s)
        users = loop.traffic.users
        freshness = []
        async with aiohttp.ClientSession(loop.url) as session:
            for i in range(args.probes):
                freshness.append(await probe_freshness(loop, session, int(users[i]), timeout_s=60))
        latencies, n = await http_load(loop.url, users, clients=args.clients, seconds=args.load_s)
        direct = await replica_direct(loop, users, n=min(300, max(50, n // 4)))
    finally:
        await loop.stop()
    return {"freshness_s": round(statistics.median(freshness), 3), "freshness_all_s": [round(f, 3) for f in freshness],
            "freshness_target_s": 10.0, "meets_target": statistics.median(freshness) < 10.0,
            "freshness_floor_s": cfg.loop.embedded_feedback_window_s,
            "bridge_p50_ms": round(percentile(latencies, 50), 2), "bridge_p99_ms": round(percentile(latencies, 99), 2),
            "requests_per_s": round(n / args.load_s, 1), "clients": args.clients,
            "replica_p50_ms": round(percentile(direct, 50), 2), "replica_p99_ms": round(percentile(direct, 99), 2),
            "simulated_concurrency": cfg.simulator.concurrency, "publish_every_s": cfg.loop.publish_every_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-s", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(bench(args))))


if __name__ == "__main__":
    main()
