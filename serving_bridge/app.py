"""The bridge: the HTTP face of serving (aiohttp), in front of the Ray serving replicas.

Invariants:
- every answered request was produced by exactly one replica call, carries that replica's
  `model_version`, and is logged to Kafka `impressions` with the context as served, each item's
  semantic id, duration and logprob, and `source: "onerec"` (the features the learner will see);
- a replica that dies or times out is skipped and the request retried on another one, at most
  once per replica: a request fails only when no replica can answer it (503);
- a bad request gets a 4xx whose body names the reason; it never reaches a replica.

Why aiohttp rather than Ray Serve: Faust already brings aiohttp, the bridge is one small process
whose hot path is one actor call plus one Kafka send on the same event loop (aiokafka), and it
keeps the weight-version protocol (our replicas, our publisher) in our hands; Ray Serve would add
its proxy, controller and deployment lifecycle around replicas we already manage.

API (JSON):
  POST /recommend  {user_id, context?, top_k?} -> {request_id, items: [{item_id, semantic_id, logprob}], model_version}
  GET  /healthz    -> {status, replicas}          (open, for probes)
  GET  /version    -> {model_version, replicas: {replica: version}}
An optional bearer token (`loop.api_token`) guards /recommend and /version.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict

import orjson
import ray
from aiohttp import web
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from learner.flags import flags_of
from simulator import kuairand
from streaming import schemas
from streaming.topics import topic_name

log = logging.getLogger(__name__)

IMPRESSION_CACHE = 50_000    # request ids remembered to find the duration of a fed-back item


class NoReplicaError(RuntimeError):
    """No replica could answer (all dead or timing out)."""


class ReplicaPool:
    """Round robin over live replica handles; dead ones are dropped and can be replaced."""

    def __init__(self, handles=()):
        self._handles: list = list(handles)
        self._counter = itertools.count()
        self.failures = 0

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def handles(self) -> list:
        return list(self._handles)

    def add(self, handle) -> None:
        self._handles.append(handle)

    def remove(self, handle) -> None:
        self._handles = [h for h in self._handles if h._actor_id != handle._actor_id]

    def order(self) -> list:
        """All live replicas, starting at the next one in round-robin order."""
        handles = self._handles
        if not handles:
            return []
        start = next(self._counter) % len(handles)
        return handles[start:] + handles[:start]

    async def recommend(self, contexts: list[dict], *, top_k: int, beam_width: int, timeout_s: float,
                        temperature: float = 0.0) -> dict:
        """One replica call, retried on the next replica when one dies or times out."""
        errors = []
        for handle in self.order():
            try:
                return await asyncio.wait_for(handle.recommend.remote(contexts, top_k, beam_width, temperature), timeout_s)
            except RayActorError as exc:   # died (or unreachable): drop it; the driver replaces it
                self.failures += 1
                self.remove(handle)
                errors.append(f"replica died: {type(exc).__name__}")
                log.warning("replica %s died; retrying on another: %s", handle._actor_id.hex()[:8], exc)
            except (asyncio.TimeoutError, GetTimeoutError):
                self.failures += 1
                errors.append(f"replica timed out after {timeout_s} s")
                log.warning("replica %s timed out; retrying on another", handle._actor_id.hex()[:8])
        raise NoReplicaError("; ".join(errors) or "no serving replica is running")


class UserViews:
    """The server's own bounded view of each user, fed by the feedback topic and its own impressions."""

    def __init__(self, *, short_len: int, long_len: int):
        self.history = kuairand.UserHistory(short_len=short_len, long_len=long_len, warm_start=True)
        self.durations = kuairand.video_durations_s()
        self.served: OrderedDict[str, dict[int, float]] = OrderedDict()   # request_id -> {item: duration}

    def remember(self, request_id: str, items: dict[int, float]) -> None:
        self.served[request_id] = items
        while len(self.served) > IMPRESSION_CACHE:
            self.served.popitem(last=False)

    def duration_of(self, request_id: str, item_id: int) -> float:
        return self.served.get(request_id, {}).get(item_id, self.durations.get(item_id, 0.0))

    def observe_feedback(self, event: dict) -> None:
        duration = self.duration_of(event["request_id"], event["item_id"])
        flags = flags_of(event, duration)
        self.history.record(event["user_id"], event["item_id"], duration, event["play_time_s"], flags)

    def context(self, user_id: int) -> dict:
        return self.history.context(user_id)


class ServingBridge:
    """State of one bridge process: replicas, user views, Kafka clients, counters."""

    def __init__(self, cfg, replicas=(), *, group_suffix: str | None = None):
        self.cfg = cfg
        self.loop_cfg = cfg.loop
        self.pool = ReplicaPool(replicas)
        self.views = UserViews(short_len=cfg.model.max_short, long_len=cfg.model.max_long)
        self.impressions_topic = topic_name(cfg.stream, "impressions")
        self.feedback_topic = topic_name(cfg.stream, "feedback")
        self.group_id = f"{cfg.stream.namespace}-bridge-{group_suffix or uuid.uuid4().hex[:8]}"
        self.producer = None
        self._feedback_task: asyncio.Task | None = None
        self.started_at = time.time()
        self.requests = 0
        self.errors = 0
        self.latencies_ms: list[float] = []
        self.max_version_served = 0

    # ---- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        opts = self.cfg.stream.client_options()
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

        opts = self.cfg.stream.client_options()
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
        top_k = body.get("top_k", self.loop_cfg.top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.loop_cfg.beam_width:
            raise ValueError(f"top_k must be an integer in [1, {self.loop_cfg.beam_width}]")
        context = body.get("context")
        if context is not None:
            schemas.validate_context(context)
        return user_id, context, top_k

    async def recommend(self, user_id: int, context: dict | None, top_k: int) -> dict:
        context = context if context is not None else self.views.context(user_id)
        start = time.perf_counter()
        served = await self.pool.recommend([context], top_k=top_k, beam_width=self.loop_cfg.beam_width,
                                           temperature=self.loop_cfg.explore_temperature,
                                           timeout_s=self.loop_cfg.request_timeout_s)
        request_id = uuid.uuid4().hex
        version = int(served["model_version"])
        items = [{"item_id": int(i), "semantic_id": [int(s) for s in sid], "logprob": float(lp)}
                 for i, sid, lp in zip(served["item_ids"][0], served["semantic_ids"][0], served["logprobs"][0])]
        durations = {it["item_id"]: self.views.durations.get(it["item_id"], 0.0) for it in items}
        impression = {"request_id": request_id, "user_id": user_id, "ts": time.time(), "model_version": version,
                      "source": "onerec", "context": context,
                      "items": [{**it, "duration_s": durations[it["item_id"]]} for it in items]}
        await self.producer.send(self.impressions_topic, schemas.encode_impression(impression),
                                 key=str(user_id).encode())   # topic layout 2: keyed by user id
        self.views.remember(request_id, durations)
        self.requests += 1
        self.max_version_served = max(self.max_version_served, version)
        self.latencies_ms.append(1000 * (time.perf_counter() - start))
        if len(self.latencies_ms) > 100_000:
            del self.latencies_ms[:50_000]
        return {"request_id": request_id, "items": items, "model_version": version}

    async def replica_versions(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for handle in self.pool.handles:
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
    token = bridge.loop_cfg.api_token

    @web.middleware
    async def auth(request: web.Request, handler):
        if token is not None and request.path != "/healthz":
            if request.headers.get("Authorization", "") != f"Bearer {token}":
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


def actor_is_alive(handle) -> bool:
    try:
        ray.get(handle.version.remote(), timeout=2.0)
        return True
    except (RayActorError, GetTimeoutError):
        return False
