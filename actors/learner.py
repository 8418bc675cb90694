"""The online learner: a sample source, a learning side, a checkpoint store and a weight publisher.

Invariants:
- Kafka offsets are committed only after the optimizer step that used their records;
- a checkpoint holds model, optimizer, tokenizer, the consumer positions and the recent sample ids
  of ONE step, and its manifest is written last (a checkpoint without a manifest does not exist);
- on restart the learner loads the latest checkpoint and seeks the consumer to ITS positions: the
  samples after it (trained by the crashed process but lost with its weights) are trained once more
  on the checkpointed model, which never saw them; no sample up to the checkpoint is trained again;
- weight versions only go forward (the publisher's counter), also across restarts and rollbacks.

The parts: `actors.sample_source.SampleSource` (Kafka: poll, decode, dedupe, commit),
`actors.learning.PolicyLearner` (the loss and the optimizer step, no Kafka), `learner.checkpoint.
CheckpointStore`, `actors.publisher.WeightPublisher`. `OnlineLearner` is the plain class that wires
them (tests drive it step by step); `LearnerActor` is the thin Ray wrapper that runs its loop.
In an A/B run every learned arm has its own OnlineLearner (its own consumer group, checkpoints,
versions and replicas), whose source keeps only that arm's samples.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import asdict

import ray
import torch

from actors.learning import PolicyLearner
from actors.sample_source import SampleSource
from learner.catalogue import ItemCatalogue
from learner.checkpoint import CheckpointStore
from learner.config import ModelConfig
from learner.model import LazyDecoder
from learner.tokenizer import SemanticTokenizer, tokenizer_bytes

log = logging.getLogger(__name__)

VERSION_INDEX = 100_000      # request ids remembered with the first version trained on them
RATE_WINDOW_S = 10.0         # samples/s in status() is over the last 10 s


def initial_policy(model_cfg: ModelConfig, *, init_from: str, tokenizer: SemanticTokenizer | None,
                   catalogue: ItemCatalogue | None) -> tuple[SemanticTokenizer, LazyDecoder, str | None]:
    """Weights and tokenizer of `init_from` (a pretraining checkpoint) if there is one, else `tokenizer`
    (or one fitted now on the catalogue) and a randomly initialised model."""
    pretrained = CheckpointStore(init_from).latest() if init_from else None
    model = LazyDecoder(model_cfg)
    if pretrained is not None and "model" in pretrained[1] and "tokenizer" in pretrained[1]:
        manifest, files = pretrained
        model.load_state_dict(files["model"])
        return SemanticTokenizer.from_tensors(files["tokenizer"]), model, manifest["path"]
    if tokenizer is None:
        if catalogue is None:
            raise ValueError("the learner needs a tokenizer, a checkpoint or an item catalogue to fit one on")
        tokenizer = catalogue.fit_tokenizer(model_cfg.codebook_size)
    return tokenizer, model, None


class OnlineLearner:
    """Consumes samples, trains, checkpoints and (with a publisher) pushes versions to replicas."""

    def __init__(self, *, model: ModelConfig, train, loop, stream, arm: str | None = None, publisher=None,
                 resume: bool = True, tokenizer: SemanticTokenizer | None = None,
                 catalogue: ItemCatalogue | None = None, fresh_topics: bool = False):
        """`fresh_topics`: the topics were created anew since the checkpoint (an in-memory embedded
        broker restarted), so its offsets mean nothing: resume weights, optimizer and sample ids, but
        read the topics from their committed offsets / beginning."""
        self.loop_cfg, self.arm = loop, arm
        device = torch.device(train.resolve_device())
        torch.manual_seed(train.seed)
        self.store = CheckpointStore(loop.checkpoint_dir, keep=loop.checkpoints_kept)
        self.publisher = publisher
        self.version = 0
        self.first_version: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._unpublished_requests: list[str] = []
        self.stats = collections.Counter()        # checkpoints, publishes, rollbacks
        self.trained_keys: collections.deque = collections.deque(maxlen=100_000)  # (request_id, item_id)
        self.sample_observers: list = []          # actors with observe_samples(samples) (drift monitor)
        self.started_at = time.time()
        self._trained_log: collections.deque = collections.deque(maxlen=10_000)   # (monotonic t, samples)
        self._last_publish_t = 0.0
        self._steps_since_publish = 0
        self._lock = threading.RLock()

        checkpoint = self.store.latest() if resume else None
        self.resumed_from = checkpoint[0]["path"] if checkpoint else None
        positions, seen = None, ()
        if checkpoint:
            manifest, files = checkpoint
            tok = SemanticTokenizer.from_tensors(files["tokenizer"])
            self.side = PolicyLearner(model, train, tok, device=device)
            self.side.load_state(files, manifest)
            self.version = int(manifest["version"])
            positions = None if fresh_topics else {int(p): int(o) for p, o in manifest["offsets"].items()}
            seen = files["seen"]["keys"].tolist()
            log.info("learner resumed from %s (step %d, version %d)", self.resumed_from, self.side.step, self.version)
        else:
            tok, net, started_from = initial_policy(model, init_from=loop.init_from, tokenizer=tokenizer,
                                                    catalogue=catalogue)
            if started_from:
                log.info("learner starts from %s", started_from)
            self.side = PolicyLearner(model, train, tok, model=net, device=device)
        if self.publisher is not None:
            self.publisher.version = max(self.publisher.version, self.version)
        group = loop.consumer_group if arm is None else f"{loop.consumer_group}-{arm}"
        self.source = SampleSource(stream, group_id=group, max_records=loop.micro_batch,
                                   max_wait_s=loop.max_batch_wait_s, positions=positions, seen=seen, arm=arm)

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "OnlineLearner":
        return cls(model=cfg.model, train=cfg.train, loop=cfg.loop, stream=cfg.stream, **kwargs)

    # ---- what the parts hold -------------------------------------------------------------------
    @property
    def model(self) -> LazyDecoder:
        return self.side.model

    @property
    def tokenizer(self) -> SemanticTokenizer:
        return self.side.tokenizer

    @property
    def step(self) -> int:
        return self.side.step

    @property
    def positions(self) -> dict[int, int]:
        return self.source.positions

    @property
    def consumer(self):
        return self.source.consumer

    @property
    def topic(self) -> str:
        return self.source.topic

    @property
    def last_losses(self) -> dict[str, float]:
        return self.side.last_losses

    @property
    def by_version(self) -> dict:
        return self.side.by_version

    def counters(self) -> collections.Counter:
        """Every part's counters together: records, bad, duplicates, trained, steps, publishes, ..."""
        return self.source.stats + self.side.stats + self.stats

    def close(self) -> None:
        self.source.close()

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """Poll, train on what came, commit, maybe checkpoint and publish. None when nothing came."""
        n_records, samples = self.source.poll()
        if not n_records:
            self.maybe_publish()
            return None
        result: dict = {"records": n_records, "samples": len(samples)}
        trained: list[dict] = []
        if samples:
            with self._lock:
                step_result = self.side.update(samples)
            if step_result is not None:
                trained = step_result.pop("trained")
                result.update(step_result)
        self.source.commit()
        if trained:
            with self._lock:
                self._trained_log.append((time.monotonic(), len(trained)))
                self._steps_since_publish += 1
                self._unpublished_requests.extend(s["request_id"] for s in trained)
                self.trained_keys.extend((s["request_id"], s["item_id"]) for s in trained)
            for observer in self.sample_observers:   # fire and forget: observers never slow training
                observer.observe_samples.remote(trained)
            if self.step % self.loop_cfg.checkpoint_every_steps == 0:
                self.checkpoint()
        self.maybe_publish()
        result["step"] = self.step
        return result

    # ---- checkpoints, publishing, rollback -----------------------------------------------------
    def checkpoint(self) -> str:
        with self._lock:
            files, manifest = self.side.state_files()
            files["seen"] = {"keys": torch.tensor(self.source.seen_keys(), dtype=torch.int64)}
            manifest.update({"version": self.version, "offsets": {str(p): o for p, o in self.positions.items()},
                             "topic": self.topic, "arm": self.arm, "model_config": asdict(self.side.model_cfg)})
            path = self.store.save(self.step, files, manifest)
            self.stats["checkpoints"] += 1
            return path

    def maybe_publish(self, *, force: bool = False) -> int | None:
        """Publish when `publish_every_steps` steps or `publish_every_s` seconds have passed."""
        if self.publisher is None:
            return None
        due = (self._steps_since_publish >= self.loop_cfg.publish_every_steps
               or (self._steps_since_publish > 0
                   and time.monotonic() - self._last_publish_t >= self.loop_cfg.publish_every_s))
        if not (due or force):
            with self._lock:
                self.publisher.catch_up()
            return None
        return self.publish()

    def publish(self) -> int:
        with self._lock:
            weights = self.publisher.publish(self.model.state_dict())
            self._published(weights.version)
            return self.version

    def _published(self, version: int) -> None:
        self.version = version
        self._last_publish_t = time.monotonic()
        self._steps_since_publish = 0
        for request_id in self._unpublished_requests:
            self.first_version.setdefault(request_id, self.version)
        self._unpublished_requests.clear()
        while len(self.first_version) > VERSION_INDEX:
            self.first_version.popitem(last=False)
        self.stats["publishes"] += 1

    def set_replicas(self, handles: list, versions: list[int]) -> None:
        """Serve through these replicas. If they serve a newer version than ours (we restarted from a
        checkpoint), push our weights under a newer number, so versions stay forward."""
        with self._lock:
            publisher = self.publisher
            publisher.version = max([publisher.version, *versions])
            publisher.set_replicas(handles, versions)
            if publisher.latest is None or publisher.latest.version < publisher.version:
                self.publish()

    def add_observer(self, handle) -> None:
        """An actor that gets every version (apply_weights) and every trained sample (observe_samples)."""
        with self._lock:
            self.publisher.add_observer(handle)
            self.sample_observers.append(handle)

    def rollback(self, to_version: int, state_dict: dict[str, torch.Tensor]) -> int:
        """Train on from `to_version`'s weights (`state_dict`), served again under a new version number."""
        with self._lock:
            self.side.load_weights(state_dict)
            weights = self.publisher.republish(int(to_version))
            self.version = weights.version
            self.stats["rollbacks"] += 1
            log.warning("rolled back to version %d, served as version %d", to_version, weights.version)
            return weights.version

    def version_for(self, request_ids: list[str]) -> dict[str, int]:
        with self._lock:
            return {r: self.first_version[r] for r in request_ids if r in self.first_version}

    def status(self) -> dict:
        with self._lock:
            window = min(RATE_WINDOW_S, max(time.time() - self.started_at, 1e-9))
            recent = sum(n for t, n in self._trained_log if t >= time.monotonic() - window)
            publisher = self.publisher
            return {"arm": self.arm, "step": self.step, "version": self.version, "stats": dict(self.counters()),
                    "samples_per_s": recent / window, "losses": dict(self.last_losses),
                    "by_version": {v: dict(c) for v, c in self.by_version.items()},
                    "replica_versions": publisher.replica_versions() if publisher is not None else {},
                    "published_at": publisher.latest.published_at if publisher and publisher.latest else None,
                    "publish_errors": publisher.errors()[-5:] if publisher else [],
                    "resumed_from": self.resumed_from, "positions": dict(self.positions)}


# ---------------------------------------------------------------------------------------------
# Ray wrapper
# ---------------------------------------------------------------------------------------------
@ray.remote(max_concurrency=4)
class LearnerActor:
    """Runs `OnlineLearner.train_step` in a loop on its own thread; other calls answer meanwhile."""

    def __init__(self, *, model, train, loop, stream, arm: str | None = None, catalogue: ItemCatalogue | None = None,
                 resume: bool = True, fresh_topics: bool = False, torch_threads: int = 1):
        from actors.publisher import WeightPublisher

        torch.set_num_threads(torch_threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
        self.learner = OnlineLearner(model=model, train=train, loop=loop, stream=stream, arm=arm,
                                     publisher=WeightPublisher(keep_versions=loop.versions_kept),
                                     resume=resume, fresh_topics=fresh_topics, catalogue=catalogue)
        self.learner.publish()        # version 1 (or checkpoint version + 1): what replicas start from
        self._stop = threading.Event()
        self._error: str | None = None

    def tokenizer_bytes(self) -> bytes:
        return tokenizer_bytes(self.learner.tokenizer)

    def latest_weights(self) -> tuple[int, list, int]:
        """(version, [ObjectRef], checksum): the ref is wrapped in a list so Ray passes it, not its value."""
        latest = self.learner.publisher.latest
        return latest.version, [latest.ref], latest.checksum

    def set_replicas(self, handles: list) -> int:
        versions = ray.get([h.version.remote() for h in handles], timeout=60)
        self.learner.set_replicas(handles, versions)
        return len(handles)

    def add_observer(self, handle) -> None:
        self.learner.add_observer(handle)

    def rollback(self, to_version: int) -> int:
        """Serve `to_version`'s weights again under a new version number and train on from them."""
        from actors.publisher import unpack_weights

        kept = self.learner.publisher.history.get(int(to_version))
        if kept is None:
            raise ValueError(f"cannot roll back to version {to_version}: no longer kept")
        return self.learner.rollback(int(to_version), unpack_weights(ray.get(kept.ref)))

    def run(self, max_steps: int | None = None) -> dict:
        """Train until `stop()` (or max_steps); returns the final status. Errors end the loop, loudly."""
        try:
            while not self._stop.is_set():
                self.learner.train_step()
                if max_steps is not None and self.learner.step >= max_steps:
                    break
            if self.learner.step > 0:
                self.learner.checkpoint()      # a clean stop resumes exactly where it ended
        except Exception as exc:  # noqa: BLE001 - recorded for status() and re-raised to the caller
            self._error = repr(exc)
            raise
        finally:
            self.learner.close()
        return self.learner.status()

    def stop(self) -> None:
        self._stop.set()

    def checkpoint(self) -> str:
        return self.learner.checkpoint()

    def version_for(self, request_ids: list[str]) -> dict[str, int]:
        """First published version whose training included each request (freshness bench)."""
        return self.learner.version_for(request_ids)

    def status(self) -> dict:
        status = self.learner.status()
        status["error"] = self._error
        return status

    def health(self) -> dict:
        return {"step": self.learner.step, "version": self.learner.version, "error": self._error}
