"""The loop on one machine (or a Ray cluster): broker, join worker, learned arms, bridge, simulated users.

Invariant: everything this starts it also stops, in reverse order, on Ctrl-C, SIGTERM or the end of
the run: the traffic, each arm's learner (after a final checkpoint) and replicas, the drift monitor,
the bridge, Ray (when started here), the join worker's process group and the embedded broker.
No process is left behind. The caller's config is never changed: the effective one is a copy.

Where the pieces run:
- broker: the embedded Tansu (`infra.broker.EmbeddedBroker`) when `stream.bootstrap_servers` is on
  loopback and nothing listens there; otherwise the cluster it names (external Kafka);
- join worker: a subprocess `onerec worker` (either `stream.engine`) in its own process group. Both
  engines own their event loop and signal handlers and expect to be a process's main program; a
  subprocess gives them that, is stopped with one signal to its group, and a crash there is visible
  (exit code, log file) without taking Ray or the bridge down. One worker serves every arm: a sample
  carries the arm of its impression;
- per learned arm (`actors.arm_runtime.LearnedArm`): a learner and its replicas, Ray actors; the
  learner pushes weights to its replicas itself (the driver never holds weight bytes);
- bridge (aiohttp) and the simulated users: this process's event loop; the users talk to the bridge
  over HTTP like any client and send their feedback to the `feedback` topic.
A supervisor replaces dead replicas and restarts dead learners (from their checkpoints) and a dead
join worker.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from actors.arm_runtime import LearnedArm
from actors.arms import ArmSpec
from actors.metrics import LoopMetrics
from learner.checkpoint import CheckpointStore
from learner.config import ModelConfig
from serving_bridge.app import ServingBridge, UserViews, bound_port, make_app, start_site
from simulator import embedded
from streaming.topics import ensure_topics

log = logging.getLogger("onerec.run")


def resolve_model_config(cfg, say=print) -> ModelConfig:
    """The model shape to run: the loop's own checkpoint's, else the pretraining checkpoint's, else
    cfg.model with the profile shape of the embedded world's contexts."""
    for url in (cfg.loop.checkpoint_dir, cfg.loop.init_from):
        if not url:
            continue
        latest = CheckpointStore(url).latest()
        if latest is not None and "model_config" in latest[0]:
            fields = {f.name for f in dataclasses.fields(ModelConfig)}
            return ModelConfig(**{k: v for k, v in latest[0]["model_config"].items() if k in fields})
    model = embedded.model_config(cfg.model)
    if model != cfg.model:
        say(f"onerec run: model.profile_fields/profile_vocab set to {model.profile_fields}/{model.profile_vocab} "
            f"(the embedded world's user profile)")
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


def single_arm(train_cfg) -> list[ArmSpec]:
    """`onerec run`: one learned arm with the configured objective."""
    return [ArmSpec(train_cfg.algorithm, True, train_cfg.algorithm, train_cfg.rl_on)]


class Loop:
    """Starts, supervises and stops every part of the loop (see the module docstring)."""

    def __init__(self, cfg, *, arms: list[ArmSpec] | None = None, cli_args: list[str] | None = None,
                 log_dir: str = "runs/logs", traffic: bool = True, manage_ray: bool = True,
                 traffic_factory=None, out=sys.stdout):
        """`arms`: the experiment's arms (None: one learned arm, `onerec run`); `traffic_factory(loop)`
        builds the simulated users once the bridge is up."""
        self.cfg = cfg
        self.arm_specs = arms if arms is not None else single_arm(cfg.train)
        self.experiment = arms is not None
        self.cli_args = list(cli_args or [])
        self.log_dir = Path(log_dir)
        self.with_traffic = traffic
        self.traffic_factory = traffic_factory
        self.manage_ray = manage_ray
        self.out = out
        self.broker = None
        self.worker: subprocess.Popen | None = None
        self.worker_log = None
        self.arms: dict[str, LearnedArm] = {}
        self.bridge: ServingBridge | None = None
        self.runner = None
        self.url = ""
        self.traffic = None
        self.catalogue = None
        self.metrics: LoopMetrics | None = None
        self.drift = None
        self._worker_overrides: list[str] = []
        self._ray_started = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.monotonic()

    # ---- the primary arm (the only one in `onerec run`) ------------------------------------------
    @property
    def primary(self) -> LearnedArm:
        return next(iter(self.arms.values()))

    @property
    def learner(self):
        return self.primary.learner

    @property
    def replicas(self) -> list:
        return self.primary.replicas

    @property
    def learner_restarts(self) -> int:
        return self.primary.restarts

    @property
    def last_status(self) -> dict:
        return self.primary.last_status if self.arms else {}

    # ---- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        # The effective config is a copy built here once; the caller's object is never changed.
        cfg = self.cfg = dataclasses.replace(self.cfg, model=resolve_model_config(self.cfg, self._say))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_broker()
        cfg = self.cfg
        ensure_topics(cfg.stream)
        self.catalogue = embedded.item_catalogue()
        if cfg.loop.join_worker:
            self._start_worker(self._worker_overrides)
        self._start_ray()
        self.metrics = LoopMetrics()
        # an in-memory broker started here has new, empty topics: a checkpoint's offsets do not apply
        fresh_topics = self.broker is not None and cfg.stream.broker_storage.startswith("memory://")
        learned = [spec for spec in self.arm_specs if spec.learned]
        n_replicas = cfg.loop.n_replicas if not self.experiment else cfg.loop.replicas_per_arm
        for spec in learned:
            arm = LearnedArm(spec, cfg, catalogue=self.catalogue, single=not self.experiment,
                             n_replicas=n_replicas, say=self._say)
            await arm.start(fresh_topics=fresh_topics)
            self.arms[spec.name] = arm
        if cfg.loop.drift_monitor:
            await self._start_drift_monitor()
        for arm in self.arms.values():
            arm.run()
        await self._start_bridge()
        self._tasks.append(asyncio.create_task(self._supervise(), name="supervise"))
        self._tasks.append(asyncio.create_task(self._progress(), name="progress"))
        if self.with_traffic:
            self.traffic = self._make_traffic()
            self._tasks.append(asyncio.create_task(self.traffic.run(self._stop), name="traffic"))

    def _start_broker(self) -> None:
        cfg = self.cfg
        if not broker_is_embedded(cfg.stream.bootstrap_servers):
            self._say(f"broker: external cluster {cfg.stream.bootstrap_servers}")
            return
        if not _port_open(cfg.stream.bootstrap_servers):
            from infra.broker import EmbeddedBroker

            port = int(cfg.stream.bootstrap_servers.rsplit(":", 1)[1])
            self.broker = EmbeddedBroker.from_config(cfg.stream, port=port,
                                                     log_path=self.log_dir / "broker.log").start(timeout_s=60)
            self._say(f"broker: embedded Tansu on {self.broker.bootstrap}")
        else:
            self._say(f"broker: using the one listening on {cfg.stream.bootstrap_servers}")
        # simulated users answer at once: the join closes feedback windows sooner than for real users
        self.cfg = dataclasses.replace(cfg, stream=dataclasses.replace(
            cfg.stream, feedback_window_s=cfg.loop.embedded_feedback_window_s))
        self._worker_overrides = [f"stream.feedback_window_s={cfg.loop.embedded_feedback_window_s}"]

    def _start_ray(self) -> None:
        cfg = self.cfg
        if not self.manage_ray or ray.is_initialized():
            return
        if cfg.loop.ray_address:
            ray.init(address=cfg.loop.ray_address, namespace=cfg.stream.namespace, log_to_driver=False)
        else:
            # logical CPUs: every actor of every arm fits (actors ask for loop.actor_num_cpus each)
            actors = 2 + sum(1 + (cfg.loop.replicas_per_arm if self.experiment else cfg.loop.n_replicas)
                             for spec in self.arm_specs if spec.learned)
            ray.init(num_cpus=max(4, os.cpu_count() or 1, int(actors * cfg.loop.actor_num_cpus + 1)),
                     include_dashboard=False, log_to_driver=False, namespace=cfg.stream.namespace,
                     configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        self._ray_started = True
        self._install_signal_handlers()   # ray.init installed its own SIGTERM handler: ours wins

    async def _start_bridge(self) -> None:
        cfg = self.cfg
        views = UserViews(embedded.user_views(short_len=cfg.model.max_short, long_len=cfg.model.max_long),
                          self.catalogue.duration_of)
        if self.experiment:
            self.bridge = ServingBridge.from_config(cfg, views=views, arms=[s.name for s in self.arm_specs],
                                                    pools={name: arm.replicas for name, arm in self.arms.items()})
        else:
            self.bridge = ServingBridge.from_config(cfg, self.primary.replicas, views=views)
        self.runner = await start_site(make_app(self.bridge), cfg.serve.bridge_host, cfg.serve.bridge_port)
        self.url = f"http://{cfg.serve.bridge_host}:{bound_port(self.runner)}"
        self._say(f"bridge: {self.url} (POST /recommend, GET /healthz, GET /version)")

    def _make_traffic(self):
        if self.traffic_factory is not None:
            return self.traffic_factory(self)
        from simulator.traffic import WorldTraffic

        return WorldTraffic(self.cfg, self.url, arms=[s.name for s in self.arm_specs], token=self.cfg.serve.api_token,
                            experiment=self.experiment)

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

    async def _start_drift_monitor(self) -> None:
        """The drift monitor watches the primary arm: every version and trained sample (actors/drift.py)."""
        from actors.drift import DriftMonitorActor

        arm = self.primary
        probes = embedded.probe_contexts(self.cfg.model)
        self.drift = DriftMonitorActor.options(num_cpus=self.cfg.loop.actor_num_cpus).remote(
            self.cfg.model, arm.tokenizer_bytes, probes, self.cfg.drift, rollback_target=arm.learner)
        await arm.learner.add_observer.remote(self.drift)
        self._say(f"drift monitor: arm {arm.name}, log {self.cfg.drift.log_path} (`onerec drift` shows it)")

    # ---- supervise and report ------------------------------------------------------------------
    async def _supervise(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            if self._stop.is_set():
                return
            try:
                self._check_worker()
                for arm in self.arms.values():
                    observers = [self.drift] if self.drift is not None and arm is self.primary else []
                    await arm.check_learner(observers=observers)
                    await arm.check_replicas(self.bridge.pools[self._pool_name(arm)])
            except Exception:  # noqa: BLE001 - the supervisor logs and keeps supervising
                log.exception("supervisor check failed")

    def _pool_name(self, arm: LearnedArm) -> str:
        return arm.name if self.experiment else next(iter(self.bridge.pools))

    def _check_worker(self) -> None:
        """A join worker that exited is started again (it resumes from its committed offsets)."""
        if self.worker is not None and self.worker.poll() is not None and not self._stop.is_set():
            self._say(f"join worker exited with {self.worker.returncode}; restarting it "
                      f"(log {self.log_dir / 'worker.log'})")
            self.worker_log.close()
            self._start_worker(self._worker_overrides)

    async def _progress(self) -> None:
        from actors.driver import progress_line

        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.loop.progress_every_s)
            for arm in self.arms.values():
                try:
                    status = await arm.status()
                except (RayActorError, asyncio.TimeoutError):
                    continue
                if arm is self.primary:
                    self.metrics.record(status, self.bridge)
                stay = self.traffic.stay_time_so_far(arm.name) if self.traffic is not None else None
                if stay is not None:
                    self.metrics.record_arm(arm.name, stay, version=status["version"])
                self._say(progress_line(status, self.bridge, time.monotonic() - self.started_at,
                                        arm=arm.name if self.experiment else None, traffic=self.traffic))

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
        return 0

    async def stop(self) -> None:
        """Reverse order of start; each step bounded in time; safe after a partial start."""
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 15.0)
        for arm in self.arms.values():
            await arm.stop()
        if self.drift is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drift.flush.remote(), 10.0)
        if self.runner is not None:
            await self.runner.cleanup()
        for name, arm in self.arms.items():
            pool = self.bridge.pools.get(self._pool_name(arm)) if self.bridge else None
            arm.kill(pool.handles if pool is not None else ())
        if self.drift is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.drift)
        if self._ray_started:
            ray.shutdown()
        self._stop_worker()
        if self.broker is not None:
            self.broker.stop()

    def _stop_worker(self) -> None:
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
