"""The world's users as traffic of the running loop: they ask the bridge over HTTP, watch, feed back to Kafka.

Invariants:
- the traffic is a client like any other: it reaches serving only through the bridge's HTTP API
  and training only through the `impressions` and `feedback` topics;
- one simulated population and one clock for every arm: pages are taken in simulated-time order
  (`simulator.sessions.Population`), at most `simulator.concurrency` in flight, so the simulated
  clock runs as fast as the loop serves; a user has at most one page in flight;
- every page is served by exactly one pipeline and recorded once in the ledgers: with probability
  `simulator.legacy_share` the legacy popularity pipeline (logged as `legacy` impressions, as
  OneRec's traffic mixes in the platform's other pipelines; the same share in every arm), else the
  user's arm: a learned arm through the bridge, a fixed arm (`popular`, `random`, `oracle`) here.
- an arm's App Stay Time counts all its users' play (`ledger`); what the arm itself served (coverage,
  Gini, cold-start share, play per video) is counted from its own pages only (`served`).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter

import numpy as np
import orjson

from simulator import kuairand
from simulator.ledger import DAY_S, StayTimeLedger
from simulator.world import World
from streaming import schemas
from streaming.arms import arm_of
from streaming.topics import topic_name

log = logging.getLogger("onerec.traffic")

FIXED_ARMS = ("popular", "random", "oracle")


class WorldTraffic:
    """Simulated users of the World in front of a running bridge (see the module docstring)."""

    def __init__(self, cfg, url: str, *, arms: list[str], token: str | None = None, world: World | None = None,
                 experiment: bool = True):
        """`arms`: every arm of the run, in order (one name for a plain `onerec run`); `experiment`:
        impressions carry the arm (a plain run logs none, so its single learner takes every sample)."""
        self.cfg, self.sim_cfg = cfg, cfg.simulator
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.arms, self.experiment = list(arms), experiment
        self.world = world if world is not None else World.load(cfg=self.sim_cfg)
        self.rng = np.random.default_rng(self.sim_cfg.seed)
        self.users = self._draw_users()
        self.population = self.world.population(self.users, seed=self.sim_cfg.seed)
        cold = [int(v) for v in self.world.item_ids if self.world.is_cold(int(v))]
        self.ledger = StayTimeLedger(len(self.world.item_ids), cold_items=cold)     # every page of the arm's users
        self.served = StayTimeLedger(len(self.world.item_ids), cold_items=cold)     # the arm's own pages
        self.arm_users = {u: self.arm_of(u) for u in self.users.tolist()}
        for user, arm in self.arm_users.items():
            self.ledger.enroll(arm, user)
        counts = np.bincount(kuairand.read_log().video_id, minlength=int(self.world.item_ids.max()) + 1)
        weights = counts[self.world.item_ids].astype(np.float64) + 1.0
        self.legacy_p = weights / weights.sum()                   # the legacy pipeline: popularity draws
        self.plays = Counter()                                    # `popular`: most played so far in the run
        self.impressions_topic = topic_name(cfg.stream, "impressions")
        self.feedback_topic = topic_name(cfg.stream, "feedback")
        self.stats = Counter()                                    # requests, pages, pages per pipeline
        self.failures = Counter()                                 # failed pages by kind (http_503, ...)
        self.legacy_requests = 0
        self.by_version: dict[int, Counter] = {}
        self.last_feedback_at: dict[str, float] = {}              # request_id -> when its feedback was sent
        self.diagnostics: dict[str, Counter] = {}                 # arm -> the oracle's view of its own pages
        self.daily: Counter = Counter()                           # (arm, simulated day) -> play seconds
        self.started = time.monotonic()
        self.producer = None

    def _draw_users(self) -> np.ndarray:
        """`simulator.users` users of the world who have a pre-week history (warm views everywhere)."""
        history = kuairand.read_user_history()
        known = np.array([u for u in self.world.users.tolist() if history.get(u, {}).get("watch_seq")], np.int64)
        pool = known if len(known) else self.world.users
        return self.rng.choice(pool, size=min(self.sim_cfg.users, len(pool)), replace=False)

    def arm_of(self, user: int) -> str:
        return self.arms[0] if len(self.arms) == 1 else arm_of(int(user), self.arms)

    # ---- the run -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp
        from aiokafka import AIOKafkaProducer

        opts = self.cfg.stream.client_options()
        self.producer = AIOKafkaProducer(bootstrap_servers=opts.pop("bootstrap_servers"), linger_ms=5, **opts)
        await self.producer.start()
        try:
            async with aiohttp.ClientSession(headers=self.headers) as session:
                await asyncio.gather(*[self._worker(session, stop) for _ in range(self.sim_cfg.concurrency)])
        finally:
            await self.producer.stop()

    async def _worker(self, session, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t, user = self.population.next_request()
            new_session = self.population.starts_session
            try:
                await self.page(session, user, t, new_session=new_session)
            except Exception:  # noqa: BLE001 - one failed page never stops the traffic; counted and logged
                self.failures["page_errors"] += 1
                log.exception("page for user %d failed", user)
                self.population.after_page(user, [], t + 1.0)

    async def page(self, session, user: int, t: float, *, new_session: bool = False) -> None:
        """One page for `user` at simulated time `t`: served, watched, fed back, recorded, next scheduled."""
        arm = self.arm_users.get(user) or self.arm_of(user)
        if self.rng.random() < self.sim_cfg.legacy_share:
            answer = await self._serve_here(user, arm, self._legacy_items(), pipeline="legacy")
        elif arm in FIXED_ARMS:
            answer = await self._serve_here(user, arm, self._fixed_items(arm, user), pipeline=arm)
        else:
            answer = await self._ask_bridge(session, user)
            if answer is None:
                self.population.after_page(user, [], t + 1.0)
                return
        items = [int(it["item_id"]) for it in answer["items"]]
        if answer["pipeline"] != "legacy":
            self._diagnose(arm, user, items)
        responses = self.world.respond(user, items, t)
        await self._feedback(user, answer, responses)
        self.ledger.record(arm, user, t, responses, items, new_session=new_session)
        self.daily[(arm, int(t // DAY_S))] += sum(float(r["play_time_s"]) for r in responses)
        if answer["pipeline"] != "legacy":
            self.served.record(arm, user, t, responses, items)
        self.plays.update(v for v, r in zip(items, responses) if r["play_time_s"] > 0)
        self.population.after_page(user, responses, t)
        self.stats["pages"] += 1

    async def _ask_bridge(self, session, user: int) -> dict | None:
        import aiohttp

        try:
            async with session.post(f"{self.url}/recommend", json={"user_id": int(user)},
                                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    self.failures[f"http_{resp.status}"] += 1
                    log.warning("bridge answered %d: %s", resp.status, body[:200])
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.failures["http_errors"] += 1
            log.warning("bridge request failed: %r", exc)
            return None
        answer = orjson.loads(body)
        self.stats["requests"] += 1
        version = int(answer["model_version"])
        self.by_version.setdefault(version, Counter())["requests"] += 1
        return {**answer, "pipeline": "policy"}

    def _diagnose(self, arm: str, user: int, items: list[int]) -> None:
        """The oracle's view of a page before the user sees it: the expected play of what the arm served
        against the best the world knows for that user now, and how much of it the user saw recently."""
        d = self.diagnostics.setdefault(arm, Counter())
        expected = self.world.expected(user, items)["play_time_s"]
        best = self.world.expected(user, self.world.oracle_top_k(user, len(items)))["play_time_s"]
        recent = self.world.state(user).recent_count
        rows = self.world._rows_of_items(items)
        d["pages"] += 1
        d["videos"] += len(items)
        d["expected_play_s"] += float(expected.sum())
        d["oracle_expected_play_s"] += float(best.sum())
        d["repeats"] += sum(recent.get(int(r), 0) > 0 for r in rows)

    def _legacy_items(self) -> list[int]:
        return [int(i) for i in self.rng.choice(self.world.item_ids, size=self.cfg.loop.top_k, replace=False,
                                                p=self.legacy_p)]

    def _fixed_items(self, arm: str, user: int) -> list[int]:
        k = self.cfg.loop.top_k
        if arm == "oracle":
            return self.world.oracle_top_k(user, k)
        if arm == "random":
            return [int(i) for i in self.rng.choice(self.world.item_ids, size=k, replace=False)]
        seen = set(self.world.context(user)["short"]["item_id"])        # popular: most played, not just seen
        ranked = [v for v, _ in self.plays.most_common(k + len(seen)) if v not in seen][:k]
        if len(ranked) < k:                                             # early on: fill from the log's popularity
            extra = self._legacy_items()
            ranked += [v for v in extra if v not in ranked][: k - len(ranked)]
        return ranked

    async def _serve_here(self, user: int, arm: str, items: list[int], *, pipeline: str) -> dict:
        """Log a page served outside the bridge as a `legacy` impression (no logged probability)."""
        request_id = uuid.uuid4().hex
        impression = {"request_id": request_id, "user_id": int(user), "ts": time.time(), "model_version": 0,
                      "source": "legacy", "context": self.world.context(user),
                      "items": [{"item_id": i, "semantic_id": None, "duration_s": self.world.duration_of(i),
                                 "logprob": None} for i in items]}
        if self.experiment:
            impression["arm"] = arm
        await self.producer.send(self.impressions_topic, schemas.encode_impression(impression),
                                 key=str(int(user)).encode())
        self.legacy_requests += pipeline == "legacy"
        self.stats[f"{pipeline}_pages"] += 1
        return {"request_id": request_id, "model_version": None, "items": impression["items"], "pipeline": pipeline}

    async def _feedback(self, user: int, answer: dict, responses: list[dict]) -> None:
        counts = self.by_version.get(int(answer["model_version"])) if answer["model_version"] is not None else None
        for item, response in zip(answer["items"], responses):
            event = {"request_id": answer["request_id"], "user_id": int(user), "item_id": int(item["item_id"]),
                     "ts": time.time(), "play_time_s": float(response["play_time_s"]),
                     "dislike": bool(response["dislike"]),
                     **{k: bool(response[k]) for k in ("like", "follow", "comment", "forward", "collect")}}
            await self.producer.send(self.feedback_topic, schemas.encode_feedback(event), key=str(int(user)).encode())
            if counts is not None:
                counts["items"] += 1
                counts["dislikes"] += event["dislike"]
                counts["play_time_ms"] += int(1000 * event["play_time_s"])
        self.last_feedback_at[answer["request_id"]] = time.time()

    async def watch(self, user: int, answer: dict) -> list[dict]:
        """The user watches an answer the caller got from the bridge itself (bench/loop.py's probes)."""
        t = max(self.ledger.max_t, 0.0)
        responses = self.world.respond(user, [int(it["item_id"]) for it in answer["items"]], t)
        await self._feedback(user, answer, responses)
        return responses

    # ---- what it measured ----------------------------------------------------------------------
    def days(self) -> float:
        return max(self.ledger.max_t / DAY_S, 1e-9)

    def stay_time_so_far(self, arm: str | None) -> float | None:
        arm = arm or self.arms[0]
        if arm not in self.ledger._arms or self.ledger.max_t <= 0:
            return None
        return float(self.ledger.per_user_day(arm, self.days()).mean())

    def report(self, *, reference: str | None = None, n_boot: int = 1000) -> dict:
        """Per arm: stay time (all pages) and what the arm itself served (its own pages)."""
        everything = self.ledger.report(days=self.days(), reference=reference, n_boot=n_boot)
        own = self.served.report(days=self.days(), n_boot=100) if self.served._arms else {"arms": {}}
        for name, arm in everything["arms"].items():
            mine = own["arms"].get(name, {})
            for key in ("coverage", "gini", "cold_start_share", "play_time_s", "like_rate", "dislike_rate"):
                arm[f"{key}_all_pages"] = arm[key]
                arm[key] = mine.get(key)
            arm["own_videos"] = mine.get("videos", 0)
            d = self.diagnostics.get(name)
            if d and d["videos"]:
                arm["oracle_view"] = {"expected_play_per_video_s": d["expected_play_s"] / d["videos"],
                                      "oracle_expected_play_per_video_s": d["oracle_expected_play_s"] / d["videos"],
                                      "repeat_share": d["repeats"] / d["videos"]}
        everything["pages"] = dict(self.stats)
        everything["failed_pages"] = dict(self.failures)
        everything["simulated_days"] = self.days()
        return everything

    def stay_time_by_day(self) -> dict[str, list[float]]:
        """Per arm, App Stay Time of each simulated day so far (play seconds per enrolled user)."""
        users = Counter(self.arm_users.values())
        last = int(self.ledger.max_t // DAY_S)
        return {arm: [self.daily[(arm, d)] / max(users[arm], 1) for d in range(last + 1)] for arm in self.arms}

    def plot_stay_time(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, days in self.stay_time_by_day().items():
            ax.plot(range(len(days)), days, marker="o", label=arm)
        ax.set_xlabel("simulated day (the last one is partial)")
        ax.set_ylabel("App Stay Time per user (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def summary(self) -> str:
        stay = {arm: self.stay_time_so_far(arm) for arm in self.arms}
        shown = ", ".join(f"{a} {v:.0f}s" for a, v in stay.items() if v is not None)
        by_day = "; ".join(f"{arm}: " + " ".join(f"{v:.0f}" for v in days) for arm, days in self.stay_time_by_day().items())
        return (f"simulator: {dict(self.stats)}, failed {dict(self.failures)}; {self.days():.2f} simulated days; "
                f"stay time per user-day: {shown or '-'}; per simulated day (s): {by_day}; "
                f"pages served by the legacy pipeline: {self.legacy_requests}")
