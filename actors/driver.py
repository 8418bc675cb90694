"""`onerec run`: the whole loop on one machine (or a Ray cluster) - broker, join worker, learner, replicas, bridge, users.

Invariant: everything this command starts it also stops, in reverse order, on Ctrl-C, SIGTERM or
the end of `--duration`: the simulator, the learner (after a final checkpoint), the bridge, the
replicas, Ray (when started here), the join worker's process group and the embedded broker. No
process is left behind.

Where the pieces run:
- broker: the embedded Tansu (`infra.broker.EmbeddedBroker`) when `stream.bootstrap_servers` is on
  loopback and nothing listens there; otherwise the cluster it names (external Kafka);
- join worker: a subprocess `onerec worker` (either `stream.engine`) in its own process group. Both
  engines own their event loop and signal handlers (Faust's `Worker` also its logging set-up) and
  expect to be a process's main program; a subprocess gives them that, is stopped with one signal to
  its group, and a crash there is visible (exit code, log file) without taking Ray or the bridge down;
- learner (1) and serving replicas (`loop.n_replicas`): Ray actors; the learner pushes weights to
  the replicas itself (the driver never holds weight bytes);
- bridge (aiohttp) and the user simulator: this process's event loop; the simulator talks to the
  bridge over HTTP like any client and sends its feedback to the `feedback` topic.
A supervisor replaces a dead replica (started from the latest published version) and restarts a
dead learner (which resumes from its latest checkpoint).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import ray
from ray.exceptions import RayActorError

from actors.learner import CheckpointStore, LearnerActor
from actors.metrics import LoopMetrics
from actors.replica import ReplicaActor
from learner.config import ModelConfig
from simulator import kuairand
from serving_bridge.app import ServingBridge, bound_port, make_app, start_site
from simulator.users import UserSimulator, flags_of_response
from streaming import schemas
from streaming.topics import ensure_topics, topic_name

log = logging.getLogger("onerec.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: loop.duration_s; 0 = until Ctrl-C)")
    parser.add_argument("--no-traffic", action="store_true", help="start everything but the user simulator")
    parser.add_argument("--log-dir", default="runs/logs", help="where the join worker and broker logs go")


def main(args: argparse.Namespace, cfg) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    duration = cfg.loop.duration_s if args.duration is None else args.duration
    if duration < 0:
        print("onerec run: --duration must be >= 0", file=sys.stderr)
        return 2
    passthrough = (["--config", args.config] if args.config else []) + [a for s in args.set for a in ("--set", s)]
    if args.preset:
        passthrough += ["--preset", args.preset]
    loop = Loop(cfg, cli_args=passthrough, log_dir=args.log_dir, traffic=not args.no_traffic)
    return asyncio.run(loop.run(duration_s=duration))


# ---------------------------------------------------------------------------------------------
def resolve_model_config(cfg, say=print) -> ModelConfig:
    """The model shape to run: the loop's own checkpoint's, else the pretraining checkpoint's, else
    cfg.model with KuaiRand's profile fields (the contexts the simulator and bridge build carry 26)."""
    for url in (cfg.loop.checkpoint_dir, cfg.loop.init_from):
        if not url:
            continue
        latest = CheckpointStore(url).latest()
        if latest is not None and "model_config" in latest[0]:
            fields = {f.name for f in dataclasses.fields(ModelConfig)}
            return ModelConfig(**{k: v for k, v in latest[0]["model_config"].items() if k in fields})
    model = cfg.model
    if (model.profile_fields, model.profile_vocab) != (kuairand.PROFILE_FIELDS, kuairand.PROFILE_VOCAB):
        say(f"onerec run: model.profile_fields/profile_vocab set to {kuairand.PROFILE_FIELDS}/"
              f"{kuairand.PROFILE_VOCAB} (KuaiRand's user profile)")
        model = model.replace(profile_fields=kuairand.PROFILE_FIELDS, profile_vocab=kuairand.PROFILE_VOCAB)
    return model


def broker_is_embedded(bootstrap: str) -> bool:
    """True when the (single) bootstrap address is on loopback: the embedded default."""
    servers = [s.strip() for s in bootstrap.split(",") if s.strip()]
    return len(servers) == 1 and servers[0].rsplit(":", 1)[0] in ("127.0.0.1", "localhost")


def _port_open(bootstrap: str) -> bool:
    import socket

    host, port = bootstrap.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False


# ---------------------------------------------------------------------------------------------
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
                                 key=str(user).encode())   # topic layout 2: keyed by user id
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
                                     key=str(user).encode())   # topic layout 2: keyed by user id
            self.sim.observe(user, item_id, duration, event["play_time_s"], flags_of_response(response, duration))
            counts["items"] += 1
            counts["dislikes"] += event["dislike"]
            counts["play_time_ms"] += int(1000 * event["play_time_s"])
        self.last_feedback_at[answer["request_id"]] = time.time()


# ---------------------------------------------------------------------------------------------
class Loop:
    """Starts, supervises and stops every part of the loop (see the module docstring)."""

    def __init__(self, cfg, *, cli_args: list[str] | None = None, log_dir: str = "runs/logs",
                 traffic: bool = True, manage_ray: bool = True, out=sys.stdout):
        self.cfg = cfg
        self.cli_args = list(cli_args or [])
        self.log_dir = Path(log_dir)
        self.with_traffic = traffic
        self.manage_ray = manage_ray
        self.out = out
        self.broker = None
        self.worker: subprocess.Popen | None = None
        self.worker_log = None
        self.learner = None
        self.learner_run = None
        self.learner_restarts = 0
        self.replicas: list = []
        self.replica_serial = 0
        self.bridge: ServingBridge | None = None
        self.runner = None
        self.url = ""
        self.traffic: SimulatedTraffic | None = None
        self.tokenizer_bytes = b""
        self.metrics: LoopMetrics | None = None
        self.drift = None
        self._worker_overrides: list[str] = []
        self.last_status: dict = {}
        self._ray_started = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        cfg.model = resolve_model_config(cfg, self._say)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        overrides: list[str] = []
        if broker_is_embedded(cfg.stream.bootstrap_servers):
            if not _port_open(cfg.stream.bootstrap_servers):
                from infra.broker import EmbeddedBroker

                port = int(cfg.stream.bootstrap_servers.rsplit(":", 1)[1])
                self.broker = EmbeddedBroker.from_config(cfg.stream, port=port,
                                                         log_path=self.log_dir / "broker.log").start(timeout_s=60)
                self._say(f"broker: embedded Tansu on {self.broker.bootstrap}")
            else:
                self._say(f"broker: using the one listening on {cfg.stream.bootstrap_servers}")
            cfg.stream.feedback_window_s = cfg.loop.embedded_feedback_window_s
            cfg.stream.__post_init__()
            overrides.append(f"stream.feedback_window_s={cfg.loop.embedded_feedback_window_s}")
        else:
            self._say(f"broker: external cluster {cfg.stream.bootstrap_servers}")
        ensure_topics(cfg.stream)
        self._worker_overrides = overrides
        if cfg.loop.join_worker:
            self._start_worker(overrides)

        if self.manage_ray and not ray.is_initialized():
            if cfg.loop.ray_address:
                ray.init(address=cfg.loop.ray_address, namespace=cfg.stream.namespace, log_to_driver=False)
            else:
                ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                         namespace=cfg.stream.namespace, configure_logging=False,
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            self._ray_started = True
            self._install_signal_handlers()   # ray.init installed its own SIGTERM handler: ours wins
        self.metrics = LoopMetrics()
        # an in-memory broker started here has new, empty topics: a checkpoint's offsets do not apply
        fresh_topics = self.broker is not None and cfg.stream.broker_storage.startswith("memory://")
        await self._start_learner(resume=True, fresh_topics=fresh_topics)
        self.tokenizer_bytes = await self.learner.tokenizer_bytes.remote()
        self.replicas = [await self._new_replica() for _ in range(cfg.loop.n_replicas)]
        await self.learner.set_replicas.remote(self.replicas)
        if cfg.loop.drift_monitor:
            await self._start_drift_monitor()
        self.learner_run = self.learner.run.remote()

        self.bridge = ServingBridge(cfg, self.replicas)
        self.runner = await start_site(make_app(self.bridge), cfg.loop.bridge_host, cfg.loop.bridge_port)
        self.url = f"http://{cfg.loop.bridge_host}:{bound_port(self.runner)}"
        self._say(f"bridge: {self.url} (POST /recommend, GET /healthz, GET /version)")
        self._tasks.append(asyncio.create_task(self._supervise(), name="supervise"))
        self._tasks.append(asyncio.create_task(self._progress(), name="progress"))
        if self.with_traffic:
            self.traffic = SimulatedTraffic(cfg, self.url, token=cfg.loop.api_token, seed=cfg.loop.seed)
            self._tasks.append(asyncio.create_task(self.traffic.run(self._stop), name="traffic"))

    def _start_worker(self, overrides: list[str]) -> None:
        command = [sys.executable, "-m", "onerec.cli", "worker", *self.cli_args, "--no-create-topics",
                   "--set", f"stream.bootstrap_servers={self.cfg.stream.bootstrap_servers}",
                   "--set", f"stream.namespace={self.cfg.stream.namespace}"]
        for item in overrides:
            command += ["--set", item]
        self.worker_log = open(self.log_dir / "worker.log", "ab")
        self.worker = subprocess.Popen(command, stdout=self.worker_log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self._say(f"join worker: pid {self.worker.pid} (log {self.log_dir / 'worker.log'})")

    async def _start_learner(self, *, resume: bool, fresh_topics: bool = False) -> None:
        loop_cfg = self.cfg.loop
        self.learner = LearnerActor.options(num_cpus=loop_cfg.actor_num_cpus, num_gpus=loop_cfg.learner_num_gpus,
                                            name=f"{self.cfg.stream.namespace}-learner-{self.learner_restarts}").remote(
                                                self.cfg, resume=resume, fresh_topics=fresh_topics)
        status = await self.learner.status.remote()
        where = f"resumed from {status['resumed_from']}" if status["resumed_from"] else "fresh start"
        self._say(f"learner: {where}, step {status['step']}, version {status['version']}")

    async def _start_drift_monitor(self) -> None:
        """The drift monitor gets every version and trained sample from the learner (actors/drift.py)."""
        from actors.drift import DriftMonitorActor

        history = kuairand.UserHistory(short_len=self.cfg.model.max_short, long_len=self.cfg.model.max_long)
        users = [u for u in sorted(kuairand.read_user_history())
                 if kuairand.read_user_history()[u].get("watch_seq")][:32]
        probes = [history.context(u) for u in users]
        self.drift = DriftMonitorActor.options(num_cpus=self.cfg.loop.actor_num_cpus).remote(
            self.cfg.model, self.tokenizer_bytes, probes, self.cfg.drift,
            rollback_target=self.learner)
        await self.learner.add_observer.remote(self.drift)
        self._say(f"drift monitor: log {self.cfg.drift.log_path} (`onerec drift` shows it)")

    async def _new_replica(self):
        loop_cfg = self.cfg.loop
        version, [ref], checksum = await self.learner.latest_weights.remote()
        self.replica_serial += 1
        replica = ReplicaActor.options(num_cpus=loop_cfg.actor_num_cpus, num_gpus=loop_cfg.replica_num_gpus,
                                       name=f"{self.cfg.stream.namespace}-replica-{self.replica_serial}").remote(
            self.cfg.model, self.tokenizer_bytes, version, ref, checksum,
            device="cuda" if loop_cfg.replica_num_gpus > 0 else "cpu")
        await replica.version.remote()      # ready (model built, weights applied)
        return replica

    # ---- supervise and report ------------------------------------------------------------------
    async def _supervise(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            if self._stop.is_set():
                return
            try:
                self._check_worker()
                await self._check_learner()
                await self._check_replicas()
            except Exception:  # noqa: BLE001 - the supervisor logs and keeps supervising
                log.exception("supervisor check failed")

    def _check_worker(self) -> None:
        """A join worker that exited is started again (it resumes from its committed offsets)."""
        if self.worker is not None and self.worker.poll() is not None and not self._stop.is_set():
            self._say(f"join worker exited with {self.worker.returncode}; restarting it "
                      f"(log {self.log_dir / 'worker.log'})")
            self.worker_log.close()
            self._start_worker(self._worker_overrides)

    async def _check_learner(self) -> None:
        done, _ = ray.wait([self.learner_run], timeout=0)
        if not done:
            return
        try:
            await self.learner_run
            return   # returned: it was asked to stop
        except Exception as exc:  # noqa: BLE001 - a dead or failed learner is restarted from its checkpoint
            self._say(f"learner stopped ({type(exc).__name__}); restarting from its latest checkpoint")
        with contextlib.suppress(Exception):
            ray.kill(self.learner)
        self.learner_restarts += 1
        await self._start_learner(resume=True)
        await self.learner.set_replicas.remote(self.bridge.pool.handles)
        if self.drift is not None:
            await self.learner.add_observer.remote(self.drift)
        self.learner_run = self.learner.run.remote()

    async def _check_replicas(self) -> None:
        alive = []
        for handle in self.bridge.pool.handles:
            try:
                await asyncio.wait_for(handle.version.remote(), 5.0)
                alive.append(handle)
            except RayActorError:
                self.bridge.pool.remove(handle)
            except asyncio.TimeoutError:
                alive.append(handle)   # busy, not dead
        changed = len(alive) != len(self.replicas)
        while len(alive) < self.cfg.loop.n_replicas:
            replica = await self._new_replica()
            self.bridge.pool.add(replica)
            alive.append(replica)
            self._say("replica replaced")
        self.replicas = alive
        if changed:
            await self.learner.set_replicas.remote(alive)

    async def _progress(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.loop.progress_every_s)
            try:
                status = await asyncio.wait_for(self.learner.status.remote(), 10.0)
            except (RayActorError, asyncio.TimeoutError):
                continue
            self.last_status = status
            self.metrics.record(status, self.bridge)
            self._say(progress_line(status, self.bridge, time.monotonic() - start))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ---- run and stop --------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)

    async def run(self, duration_s: float = 0.0) -> int:
        loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        try:
            await self.start()
            if duration_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), duration_s)
            else:
                await self._stop.wait()
        finally:
            await self.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        self._say(summary_table(self.last_status, self.traffic))
        return 0

    async def stop(self) -> None:
        """Reverse order of start; each step bounded in time; safe after a partial start."""
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 15.0)
        if self.learner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.learner.stop.remote(), 10.0)
            if self.learner_run is not None:
                with contextlib.suppress(Exception):
                    self.last_status = await asyncio.wait_for(self.learner_run, 60.0)
        if self.drift is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drift.flush.remote(), 10.0)
        if self.runner is not None:
            await self.runner.cleanup()
        for actor in [*self.replicas, *(self.bridge.pool.handles if self.bridge else []), self.learner, self.drift]:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        if self._ray_started:
            ray.shutdown()
        if self.worker is not None and self.worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait(timeout=10)
        if self.worker_log is not None:
            self.worker_log.close()
        if self.broker is not None:
            self.broker.stop()


def progress_line(status: dict, bridge, elapsed_s: float) -> str:
    """One line: version, replicas, throughput, and what users did with the latest served versions."""
    replicas = ",".join(str(v) for v in status.get("replica_versions", {}).values())
    parts = [f"[{elapsed_s:6.1f}s] v{status['version']} (replicas {replicas or '-'})",
             f"step {status['step']}", f"{status['samples_per_s']:.1f} samples/s",
             f"req {bridge.requests if bridge else 0}"]
    losses = status.get("losses") or {}
    if losses:
        parts.append(f"loss {losses.get('loss', float('nan')):.3f}")
    shown = [(v, c) for v, c in sorted(status.get("by_version", {}).items(), key=lambda kv: int(kv[0]))
             if c.get("feedback")][-2:]
    for version, c in shown:
        n = c["feedback"]
        parts.append(f"served v{version}: pos {c['positives'] / n:.1%} dislike {c['dislikes'] / n:.1%} "
                     f"play {c['play_time_ms'] / n / 1000:.1f}s (n={n})")
    return " | ".join(parts)


def summary_table(status: dict, traffic: SimulatedTraffic | None) -> str:
    """Per serving version: samples trained, positive and dislike shares, mean play time."""
    rows = ["version  samples  positive  dislike  play_s"]
    for version, c in sorted((status or {}).get("by_version", {}).items(), key=lambda kv: int(kv[0])):
        n = c.get("feedback", 0)
        if n:
            rows.append(f"{int(version):7d}  {c['samples']:7d}  {c['positives'] / n:8.1%}  {c['dislikes'] / n:7.1%}"
                        f"  {c['play_time_ms'] / n / 1000:6.1f}")
    if traffic is not None:
        rows.append(f"simulator: {dict(traffic.stats)}, of which served by the legacy pipeline: {traffic.legacy_requests}")
    return "\n".join(rows)
