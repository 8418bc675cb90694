"""The bridge: the HTTP face of serving (aiohttp), in front of the Ray serving replicas.

Invariants:
- every answered request was produced by exactly one replica call, carries that replica's
  `model_version`, and is logged to Kafka `impressions` with the context as served, each item's
  semantic id, duration and logprob, and `source: "onerec"` (the features the learner will see);
- a replica that dies or times out is skipped and the request retried on another one, at most
  once per replica: a request fails only when no replica can answer it (503);
- a bad request gets a 4xx whose body names the reason; it never reaches a replica; the work a
  request controls is capped by `[serve]` (`max_top_k`, `max_context_items`, 1 MiB of body).

Why aiohttp rather than Ray Serve: Faust already brings aiohttp, the bridge is one small process
whose hot path is one actor call plus one Kafka send on the same event loop (aiokafka), and it
keeps the weight-version protocol (our replicas, our publisher) in our hands; Ray Serve would add
its proxy, controller and deployment lifecycle around replicas we already manage.

API (JSON):
  POST /recommend  {user_id, context?, top_k?} -> {request_id, items: [{item_id, semantic_id, logprob}], model_version}
  GET  /healthz    -> {status, replicas}          (open, for probes)
  GET  /version    -> {model_version, replicas: {replica: version}}
An optional bearer token (`serve.api_token`) guards /recommend and /version.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections import OrderedDict

import orjson
from aiohttp import web
from ray.exceptions import RayActorError, RayTaskError

from learner.flags import flags_of
from serving_bridge.config import ServeConfig
from serving_bridge.pool import NoReplicaError, ReplicaPool  # noqa: F401 - ReplicaPool is part of the API
from serving_bridge.routing import ArmNotServed, ArmRouter, BatchingPool
from streaming import schemas
from streaming.config import StreamConfig
from streaming.topics import topic_name

log = logging.getLogger(__name__)

IMPRESSION_CACHE = 50_000    # request ids remembered to find the duration of a fed-back item
BATCH_WAIT_S = 0.005         # requests within 5 ms of each other share one replica call
MAX_BATCH = 32               # ... at most this many


class UserViews:
    """The server's own bounded view of each user, fed by the feedback topic and its own impressions."""

    def __init__(self, history, duration_of):
        """`history`: a `learner.history.UserHistory` (or anything with `record` and `context`);
        `duration_of(item_id) -> seconds`: the catalogue's durations (e.g. `ItemCatalogue.duration_of`)."""
        self.history = history
        self.catalogue_duration = duration_of
        self.served: OrderedDict[str, dict[int, float]] = OrderedDict()   # request_id -> {item: duration}

    def remember(self, request_id: str, items: dict[int, float]) -> None:
        self.served[request_id] = items
        while len(self.served) > IMPRESSION_CACHE:
            self.served.popitem(last=False)

    def duration_of(self, request_id: str, item_id: int) -> float:
        served = self.served.get(request_id, {}).get(item_id)
        return served if served is not None else self.catalogue_duration(item_id)

    def observe_feedback(self, event: dict) -> None:
        duration = self.duration_of(event["request_id"], event["item_id"])
        flags = flags_of(event, duration)
        self.history.record(event["user_id"], event["item_id"], duration, event["play_time_s"], flags)

    def context(self, user_id: int) -> dict:
        return self.history.context(user_id)


class ServingBridge:
    """State of one bridge process: replicas, user views, Kafka clients, counters.

    It is handed its own `[serve]` section, the `[stream]` it logs to, the beam it asks the replicas
    for (`beam_width`, the default `top_k`, `temperature`) and its source of user views. Single
    policy: `replicas`. A/B: `arms` (every arm of the experiment, in order) and `pools` (arm -> replica
    handles, for the learned arms served here).
    """

    def __init__(self, serve: ServeConfig, stream: StreamConfig, replicas=(), *, views: UserViews, beam_width: int,
                 top_k: int, temperature: float, arms: list[str] | None = None, pools: dict[str, list] | None = None,
                 group_suffix: str | None = None):
        self.serve = serve
        self.stream = stream
        self.beam_width = beam_width
        self.max_top_k = min(serve.max_top_k, beam_width)
        if not 1 <= top_k <= self.max_top_k:
            raise ValueError(f"the default top_k {top_k} must be in [1, {self.max_top_k}] "
                             f"(serve.max_top_k={serve.max_top_k}, beam_width={beam_width})")
        self.default_top_k = top_k
        self.temperature = temperature
        self.experiment = pools is not None
        arms = list(arms) if arms is not None else ["policy"]
        pools = pools if pools is not None else {arms[0]: list(replicas)}
        self.pools = {arm: ReplicaPool(handles) for arm, handles in pools.items()}
        self.pool = next(iter(self.pools.values()))          # the first arm's (the only one without A/B)
        self.router = ArmRouter(arms, {arm: self._batching(pool) for arm, pool in self.pools.items()})
        self.views = views
        self.impressions_topic = topic_name(stream, "impressions")
        self.feedback_topic = topic_name(stream, "feedback")
        self.group_id = f"{stream.namespace}-bridge-{group_suffix or uuid.uuid4().hex[:8]}"
        self.producer = None
        self._feedback_task: asyncio.Task | None = None
        self.started_at = time.time()
        self.requests = 0
        self.errors = 0
        self.latencies_ms: list[float] = []
        self.max_version_served = 0

    @classmethod
    def from_config(cls, cfg, replicas=(), *, views: UserViews, arms: list[str] | None = None,
                    pools: dict[str, list] | None = None, group_suffix: str | None = None) -> "ServingBridge":
        """The bridge of a composed `onerec.config.Config`: [serve], [stream] and the loop's beam."""
        return cls(cfg.serve, cfg.stream, replicas, views=views, beam_width=cfg.loop.beam_width, top_k=cfg.loop.top_k,
                   temperature=cfg.loop.explore_temperature, arms=arms, pools=pools, group_suffix=group_suffix)

    # ---- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        opts = self.stream.client_options()
        self.producer = AIOKafkaProducer(bootstrap_servers=opts.pop("bootstrap_servers"), linger_ms=5,
                                         acks=1, **opts)
        await self.producer.start()
        self._feedback_task = asyncio.create_task(self._follow_feedback(), name="bridge-feedback")

    async def stop(self) -> None:
        if self._feedback_task is not None:
            self._feedback_task.cancel()
            await asyncio.gather(self._feedback_task, return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()   # flushes the impressions still buffered

    async def _follow_feedback(self) -> None:
        """Update the user views from the feedback topic (latest offsets: the view is a cache)."""
        from aiokafka import AIOKafkaConsumer

        opts = self.stream.client_options()
        consumer = AIOKafkaConsumer(self.feedback_topic, bootstrap_servers=opts.pop("bootstrap_servers"),
                                    group_id=self.group_id, auto_offset_reset="latest",
                                    enable_auto_commit=True, **opts)
        await consumer.start()
        try:
            async for record in consumer:
                try:
                    self.views.observe_feedback(schemas.decode_feedback(record.value))
                except schemas.SchemaError as exc:
                    log.debug("feedback skipped by the bridge view: %s", exc.reason)
        finally:
            await consumer.stop()

    # ---- requests ------------------------------------------------------------------------------
    def parse_request(self, body: object) -> tuple[int, dict | None, int]:
        """(user_id, context or None, top_k) from a /recommend body; ValueError names the field."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object with user_id")
        unknown = sorted(set(body) - {"user_id", "context", "top_k"})
        if unknown:
            raise ValueError(f"unknown fields {unknown} (known: user_id, context, top_k)")
        user_id = body.get("user_id")
        if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id < 0:
            raise ValueError("user_id must be a non-negative integer")
        top_k = body.get("top_k", self.default_top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.max_top_k:
            raise ValueError(f"top_k must be an integer in [1, {self.max_top_k}]")
        context = body.get("context")
        if context is not None:
            schemas.validate_context(context)
            n_items = len(context["short"]["item_id"]) + len(context["long"]["item_id"])
            if n_items > self.serve.max_context_items:
                raise ValueError(f"context has {n_items} items (short + long); at most "
                                 f"{self.serve.max_context_items} (serve.max_context_items)")
        return user_id, context, top_k

    async def recommend(self, user_id: int, context: dict | None, top_k: int) -> dict:
        context = context if context is not None else self.views.context(user_id)
        start = time.perf_counter()
        arm, served = await self.router.recommend(user_id, context, top_k)
        request_id = uuid.uuid4().hex
        version = int(served["model_version"])
        items = [{"item_id": int(i), "semantic_id": [int(s) for s in sid], "logprob": float(lp)}
                 for i, sid, lp in zip(served["item_ids"][0], served["semantic_ids"][0], served["logprobs"][0])]
        durations = {it["item_id"]: self.views.catalogue_duration(it["item_id"]) for it in items}
        impression = {"request_id": request_id, "user_id": user_id, "ts": time.time(), "model_version": version,
                      "source": "onerec", "context": context,
                      "items": [{**it, "duration_s": durations[it["item_id"]]} for it in items]}
        if self.experiment:
            impression["arm"] = arm
        await self.producer.send(self.impressions_topic, schemas.encode_impression(impression),
                                 key=str(user_id).encode())   # topic layout 2: keyed by user id
        self.views.remember(request_id, durations)
        self.requests += 1
        self.max_version_served = max(self.max_version_served, version)
        self.latencies_ms.append(1000 * (time.perf_counter() - start))
        if len(self.latencies_ms) > 100_000:
            del self.latencies_ms[:50_000]
        answer = {"request_id": request_id, "items": items, "model_version": version}
        return {**answer, "arm": arm} if self.experiment else answer

    def _batching(self, pool: ReplicaPool) -> BatchingPool:
        return BatchingPool(pool, beam_width=self.beam_width, temperature=self.temperature,
                            timeout_s=self.serve.request_timeout_s, batch_wait_s=BATCH_WAIT_S, max_batch=MAX_BATCH)

    async def replica_versions(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for handle in (h for pool in self.pools.values() for h in pool.handles):
            try:
                out[handle._actor_id.hex()[:8]] = await asyncio.wait_for(handle.version.remote(), 2.0)
            except (RayActorError, asyncio.TimeoutError):
                out[handle._actor_id.hex()[:8]] = None
        return out


# ---- aiohttp application ----------------------------------------------------------------------
BRIDGE = web.AppKey("bridge", ServingBridge)


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def make_app(bridge: ServingBridge) -> web.Application:
    token = bridge.serve.api_token
    expected = f"Bearer {token}".encode() if token is not None else b""

    @web.middleware
    async def auth(request: web.Request, handler):
        if token is not None and request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):   # constant time: no timing oracle on the token
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return await handler(request)

    async def recommend(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"body is not valid JSON: {exc}")
        try:
            user_id, context, top_k = bridge.parse_request(body)
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            answer = await bridge.recommend(user_id, context, top_k)
        except NoReplicaError as exc:
            bridge.errors += 1
            return _error(503, f"no replica could answer: {exc}")
        except ArmNotServed as exc:
            return _error(409, str(exc))
        except ValueError as exc:   # the replica's featurizer rejected the context (RayTaskError is one)
            bridge.errors += 1
            return _error(422, f"context rejected: {_last_line(exc)}")
        except RayTaskError as exc:  # the replica failed on this request: say why, keep serving
            bridge.errors += 1
            log.warning("replica failed on a request: %s", _last_line(exc))
            return _error(500, f"replica error: {_last_line(exc)}")
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        alive = len(bridge.pool)
        return web.json_response({"status": "ok" if alive else "no replicas", "replicas": alive},
                                 status=200 if alive else 503)

    async def version(request: web.Request) -> web.Response:
        versions = await bridge.replica_versions()
        known = [v for v in versions.values() if v is not None]
        return web.json_response({"model_version": max(known) if known else None, "replicas": versions,
                                  "max_version_served": bridge.max_version_served})

    async def on_startup(app: web.Application) -> None:
        await bridge.start()

    async def on_cleanup(app: web.Application) -> None:
        await bridge.stop()

    app = web.Application(middlewares=[auth], client_max_size=1 << 20)
    app.add_routes([web.post("/recommend", recommend), web.get("/healthz", healthz), web.get("/version", version)])
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app[BRIDGE] = bridge
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on host:port (port 0 = any free port); returns the runner to clean up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]
