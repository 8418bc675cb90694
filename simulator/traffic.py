"""Simulated traffic for the embedded loop: users ask the bridge over HTTP, watch, and send feedback to Kafka.

Invariant: the traffic is a client like any other: it reaches serving only through the bridge's
HTTP API and training only through the `impressions` and `feedback` topics. A share of the requests
(`loop.sim_legacy_share`) is served by a legacy popularity pipeline and logged as `legacy`
impressions, as OneRec's traffic mixes in the platform's other pipelines.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter

import numpy as np
import orjson

from simulator import kuairand
from simulator.users import UserSimulator, flags_of_response
from streaming import schemas
from streaming.topics import topic_name

log = logging.getLogger("onerec.traffic")


class SimulatedTraffic:
    """Simulated users: ask the bridge over HTTP, watch what they get, send feedback to Kafka."""

    def __init__(self, cfg, url: str, *, token: str | None = None, seed: int = 0):
        self.cfg = cfg
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.sim = UserSimulator.default(seed=seed)
        rng = np.random.default_rng(seed)
        # users with a pre-week KuaiRand history, so the bridge's own view of them is never empty
        history = kuairand.read_user_history()
        known = np.array([u for u in self.sim.user_ids.tolist() if history.get(u, {}).get("watch_seq")],
                         dtype=np.int64)
        pool = known if len(known) else self.sim.user_ids
        self.users = rng.choice(pool, size=min(cfg.loop.sim_users, len(pool)), replace=False)
        self.rng = rng
        # the "legacy pipeline" that serves the other share of traffic: popularity-weighted draws
        # from the KuaiRand week, as another recommender of the platform would
        counts = np.bincount(kuairand.read_log().video_id, minlength=int(self.sim.item_ids.max()) + 1)
        weights = counts[self.sim.item_ids].astype(np.float64) + 1.0
        self.legacy_p = weights / weights.sum()
        self.impressions_topic = topic_name(cfg.stream, "impressions")
        self.feedback_topic = topic_name(cfg.stream, "feedback")
        self.stats = Counter()                            # requests, and failures by kind
        self.legacy_requests = 0
        self.by_version: dict[int, Counter] = {}
        self.last_feedback_at: dict[str, float] = {}     # request_id -> when its feedback was sent
        self.producer = None

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp
        from aiokafka import AIOKafkaProducer

        opts = self.cfg.stream.client_options()
        self.producer = AIOKafkaProducer(bootstrap_servers=opts.pop("bootstrap_servers"), linger_ms=5, **opts)
        await self.producer.start()
        try:
            async with aiohttp.ClientSession(headers=self.headers) as session:
                workers = [asyncio.create_task(self._user_loop(session, stop, i))
                           for i in range(self.cfg.loop.sim_concurrency)]
                await asyncio.gather(*workers)
        finally:
            await self.producer.stop()

    async def _user_loop(self, session, stop: asyncio.Event, worker: int) -> None:
        import aiohttp

        interval = self.cfg.loop.sim_concurrency / self.cfg.loop.sim_users_per_s
        next_at = time.monotonic() + worker * interval / self.cfg.loop.sim_concurrency
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
            next_at = max(next_at + interval, time.monotonic())
            user = int(self.rng.choice(self.users))
            if self.rng.random() < self.cfg.loop.sim_legacy_share:
                await self.watch(user, await self.legacy_request(user))
                continue
            try:
                async with session.post(f"{self.url}/recommend", json={"user_id": user},
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        self.stats[f"http_{resp.status}"] += 1
                        log.warning("bridge answered %d: %s", resp.status, body[:200])
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.stats["http_errors"] += 1
                log.warning("bridge request failed: %r", exc)
                continue
            await self.watch(user, orjson.loads(body))

    async def legacy_request(self, user: int) -> dict:
        """Serve one request from the legacy pipeline and log it as a `legacy` impression.

        Why: trained only on its own exposures, L_Gen narrows the policy onto a few items (coverage
        0.001 after a minute, measured); in OneRec most SFT exposures come from the platform's other
        pipelines (source "legacy", no logprob: GBPO then uses pi_old = sg(pi))."""
        items = self.rng.choice(self.sim.item_ids, size=self.cfg.loop.top_k, replace=False, p=self.legacy_p)
        request_id = uuid.uuid4().hex
        impression = {"request_id": request_id, "user_id": user, "ts": time.time(), "model_version": 0,
                      "source": "legacy", "context": self.sim.context(user),
                      "items": [{"item_id": int(i), "semantic_id": None, "duration_s": self.sim.duration_of(int(i)),
                                 "logprob": None} for i in items]}
        await self.producer.send(self.impressions_topic, schemas.encode_impression(impression),
                                 key=request_id.encode())
        self.legacy_requests += 1
        return {"request_id": request_id, "model_version": None, "items": impression["items"]}

    async def watch(self, user: int, answer: dict) -> None:
        """The user watches every shown item; one feedback event per item."""
        legacy = answer["model_version"] is None
        counts = self.by_version.setdefault(int(answer["model_version"]), Counter()) if not legacy else Counter()
        counts["requests"] += 1
        self.stats["requests"] += 1
        for item in answer["items"]:
            item_id = int(item["item_id"])
            response = self.sim.respond(user, item_id)
            duration = self.sim.duration_of(item_id)
            event = {"request_id": answer["request_id"], "user_id": user, "item_id": item_id, "ts": time.time(),
                     "play_time_s": float(response["play_time_s"]), "dislike": bool(response["dislike"]),
                     **{k: bool(response[k]) for k in ("like", "follow", "comment", "forward", "collect")}}
            await self.producer.send(self.feedback_topic, schemas.encode_feedback(event),
                                     key=answer["request_id"].encode())
            self.sim.observe(user, item_id, duration, event["play_time_s"], flags_of_response(response, duration))
            counts["items"] += 1
            counts["dislikes"] += event["dislike"]
            counts["play_time_ms"] += int(1000 * event["play_time_s"])
        self.last_feedback_at[answer["request_id"]] = time.time()

    def summary(self) -> str:
        return (f"simulator: {dict(self.stats)}, of which served by the legacy pipeline: {self.legacy_requests}")
