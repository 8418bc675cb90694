"""One learned arm's processes: its learner actor and its serving replicas, started, supervised, stopped.

Invariants:
- the arm's learner trains only on its own arm's samples (its `SampleSource` filters on the arm) and
  publishes its own versions, to its own replicas; versions only go forward, also across restarts;
- a learner that died is restarted from its latest checkpoint; the time from noticing the death to
  the restarted learner answering is added to `down_s`, which the A/B report shows;
- a dead replica is replaced by one started from the learner's latest published version.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import ray
from ray.exceptions import RayActorError

from actors.arms import ArmSpec, arm_sections
from actors.learner import LearnerActor
from actors.replica import ReplicaActor


class LearnedArm:
    def __init__(self, spec: ArmSpec, cfg, *, catalogue, single: bool, n_replicas: int, say=print):
        """`single`: the only learned arm of a plain `onerec run` (no arm filter, the configured paths)."""
        self.spec, self.cfg, self.catalogue, self.say = spec, cfg, catalogue, say
        self.single, self.n_replicas = single, n_replicas
        self.train_cfg, self.loop_cfg = arm_sections(spec, cfg.train, cfg.loop, single=single)
        self.learner = None
        self.learner_run = None
        self.restarts = 0
        self.down_s = 0.0
        self.replicas: list = []
        self.replica_serial = 0
        self.tokenizer_bytes = b""
        self.last_status: dict = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def _actor_name(self, kind: str, serial: int) -> str:
        arm = "" if self.single else f"{self.name}-"
        return f"{self.cfg.stream.namespace}-{arm}{kind}-{serial}"

    async def start(self, *, fresh_topics: bool) -> None:
        await self._start_learner(resume=True, fresh_topics=fresh_topics)
        self.tokenizer_bytes = await self.learner.tokenizer_bytes.remote()
        self.replicas = [await self.new_replica() for _ in range(self.n_replicas)]
        await self.learner.set_replicas.remote(self.replicas)

    def run(self) -> None:
        self.learner_run = self.learner.run.remote()

    async def _start_learner(self, *, resume: bool, fresh_topics: bool = False) -> None:
        loop = self.loop_cfg
        self.learner = LearnerActor.options(
            num_cpus=loop.actor_num_cpus, num_gpus=loop.learner_num_gpus,
            name=self._actor_name("learner", self.restarts)).remote(
                model=self.cfg.model, train=self.train_cfg, loop=loop, stream=self.cfg.stream,
                arm=None if self.single else self.name, catalogue=self.catalogue,
                resume=resume, fresh_topics=fresh_topics)
        status = await self.learner.status.remote()
        where = f"resumed from {status['resumed_from']}" if status["resumed_from"] else "fresh start"
        label = "learner" if self.single else f"arm {self.name}: learner ({self.spec.algorithm}, rl_on {self.spec.rl_on})"
        self.say(f"{label}: {where}, step {status['step']}, version {status['version']}")

    async def new_replica(self):
        loop = self.loop_cfg
        version, [ref], checksum = await self.learner.latest_weights.remote()
        self.replica_serial += 1
        replica = ReplicaActor.options(num_cpus=loop.actor_num_cpus, num_gpus=loop.replica_num_gpus,
                                       name=self._actor_name("replica", self.replica_serial)).remote(
            self.cfg.model, self.tokenizer_bytes, version, ref, checksum,
            device="cuda" if loop.replica_num_gpus > 0 else "cpu", dtype=self.cfg.serve.dtype)
        await replica.version.remote()      # ready (model built, weights applied)
        return replica

    # ---- supervision ---------------------------------------------------------------------------
    async def check_learner(self, *, observers=()) -> bool:
        """Restart a learner that died (from its checkpoint). True when it restarted one."""
        done, _ = ray.wait([self.learner_run], timeout=0)
        if not done:
            return False
        try:
            await self.learner_run
            return False   # returned: it was asked to stop
        except Exception as exc:  # noqa: BLE001 - a dead or failed learner is restarted from its checkpoint
            self.say(f"{'learner' if self.single else f'arm {self.name}: learner'} stopped "
                     f"({type(exc).__name__}); restarting from its latest checkpoint")
        noticed = time.monotonic()
        with contextlib.suppress(Exception):
            ray.kill(self.learner)
        self.restarts += 1
        await self._start_learner(resume=True)
        await self.learner.set_replicas.remote(self.replicas)
        for observer in observers:
            await self.learner.add_observer.remote(observer)
        self.run()
        self.down_s += time.monotonic() - noticed
        return True

    async def check_replicas(self, pool) -> None:
        """Drop dead replicas from the bridge's pool for this arm and start replacements."""
        alive = []
        for handle in pool.handles:
            try:
                await asyncio.wait_for(handle.version.remote(), 5.0)
                alive.append(handle)
            except RayActorError:
                pool.remove(handle)
            except asyncio.TimeoutError:
                alive.append(handle)   # busy, not dead
        changed = len(alive) != len(self.replicas)
        while len(alive) < self.n_replicas:
            replica = await self.new_replica()
            pool.add(replica)
            alive.append(replica)
            self.say("replica replaced" if self.single else f"arm {self.name}: replica replaced")
        self.replicas = alive
        if changed:
            await self.learner.set_replicas.remote(alive)

    async def status(self) -> dict:
        self.last_status = await asyncio.wait_for(self.learner.status.remote(), 10.0)
        return self.last_status

    async def stop(self) -> None:
        if self.learner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.learner.stop.remote(), 10.0)
            if self.learner_run is not None:
                with contextlib.suppress(Exception):
                    self.last_status = await asyncio.wait_for(self.learner_run, 60.0)

    def kill(self, pool_handles=()) -> None:
        for actor in [*self.replicas, *pool_handles, self.learner]:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
