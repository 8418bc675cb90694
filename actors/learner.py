"""The online learner: consumes `samples`, trains L_Gen + GBPO, checkpoints, and publishes weights.

Invariants:
- Kafka offsets are committed only after the optimizer step that used their records;
- a checkpoint holds model, optimizer, tokenizer, the consumer positions and the recent sample ids
  of ONE step, and its manifest is written last (a checkpoint without a manifest does not exist);
- on restart the learner loads the latest checkpoint and seeks the consumer to ITS positions: the
  samples after it (trained by the crashed process but lost with its weights) are trained once more
  on the checkpointed model, which never saw them; no sample up to the checkpoint is trained again;
- a sample is identified by (request_id, item_id); redeliveries within the remembered window
  (`SEEN_KEYS`, kept across checkpoints) are skipped;
- a bad record is counted and skipped (its offset still advances): it never stops the loop.

Loss per step (report section 3): `sft_weight * L_Gen` over every exposure (eq. 10) plus
`rl_weight * GBPO` (eqs. 11-12; or ECPO, eqs. 13-14) over the samples with A != 0, where A comes
from `streaming.reward.advantages` over the step's samples that have feedback. GBPO uses one
log-probability per item: `LazyDecoder.item_logprob`, the sum over the 3 semantic-id levels,
the same quantity the replicas log as pi_old.

`OnlineLearner` is the plain class (tests drive it step by step); `LearnerActor` runs its loop in Ray.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any

import fsspec
import numpy as np
import ray
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.losses import ecpo_loss, gbpo_loss
from learner.model import LazyDecoder
from learner.tokenizer import SemanticTokenizer, tokenizer_bytes
from simulator import kuairand
from streaming import schemas
from streaming.reward import advantages
from streaming.topics import topic_name

log = logging.getLogger(__name__)

SEEN_KEYS = 200_000          # sample ids remembered for dedupe (hashed, checkpointed)
VERSION_INDEX = 100_000      # request ids remembered with the first version trained on them
MANIFEST = "manifest.json"
RATE_WINDOW_S = 10.0         # samples/s in status() is over the last 10 s


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
class CheckpointStore:
    """Checkpoint folders `step-00000042/` under an fsspec URL (local path or s3://bucket/prefix)."""

    def __init__(self, url: str, *, keep: int = 3):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.keep = keep

    def _folders(self) -> list[str]:
        """Complete checkpoints (manifest present), oldest first."""
        if not self.fs.exists(self.root):
            return []
        done = []
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and self.fs.exists(f"{path}/{MANIFEST}"):
                done.append(path.rstrip("/"))
        return sorted(done)

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], manifest: dict) -> str:
        """Write each tensor group as `<name>.safetensors`, then the manifest; prune old ones."""
        folder = f"{self.root}/step-{step:08d}"
        self.fs.makedirs(folder, exist_ok=True)
        for name, tensors in files.items():
            with self.fs.open(f"{folder}/{name}.safetensors", "wb") as f:
                f.write(st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))
        manifest = {**manifest, "files": sorted(f"{n}.safetensors" for n in files), "saved_at": time.time()}
        with self.fs.open(f"{folder}/{MANIFEST}", "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
        for old in self._folders()[:-self.keep]:
            self.fs.rm(old, recursive=True)
        return folder

    def latest(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
        """(manifest, {file name: tensors}) of the newest complete checkpoint, or None."""
        folders = self._folders()
        if not folders:
            return None
        folder = folders[-1]
        with self.fs.open(f"{folder}/{MANIFEST}", "rb") as f:
            manifest = json.loads(f.read())
        files = {}
        for file_name in manifest["files"]:
            with self.fs.open(f"{folder}/{file_name}", "rb") as f:
                files[file_name.removesuffix(".safetensors")] = st_load(f.read())
        manifest["path"] = folder
        return manifest, files


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer state dict to named tensors + JSON param groups (no pickles)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state[int(index)][key] = value
    optimizer.load_state_dict({"state": dict(state), "param_groups": groups})


def default_tokenizer(model_cfg: ModelConfig) -> SemanticTokenizer:
    """Fit the semantic-id tokenizer on the shipped KuaiRand catalogue (seconds on 2 cores)."""
    item_ids, emb = kuairand.item_embeddings()
    tok = SemanticTokenizer()
    k = model_cfg.codebook_size
    tok.fit(item_ids, emb, codebook_sizes=(k, k, k))
    return tok


def key_hash(request_id: str, item_id: int) -> int:
    """A sample id as a signed 64-bit int (checkpointable as a tensor)."""
    digest = hashlib.blake2b(f"{request_id}\x00{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# ---------------------------------------------------------------------------------------------
# the learner
# ---------------------------------------------------------------------------------------------
class OnlineLearner:
    """Consumes samples, trains, checkpoints and (with a publisher) pushes versions to replicas."""

    def __init__(self, cfg, *, publisher=None, resume: bool = True, tokenizer: SemanticTokenizer | None = None,
                 fresh_topics: bool = False):
        """`fresh_topics`: the topics were created anew since the checkpoint (an in-memory embedded
        broker restarted), so its offsets mean nothing: resume weights, optimizer and sample ids, but
        read the topics from their committed offsets / beginning."""
        self.cfg = cfg
        self.loop_cfg = cfg.loop
        self.model_cfg: ModelConfig = cfg.model
        self.device = torch.device(cfg.train.resolve_device())
        torch.manual_seed(cfg.train.seed)
        self.store = CheckpointStore(cfg.loop.checkpoint_dir, keep=cfg.loop.checkpoints_kept)
        self.topic = topic_name(cfg.stream, "samples")
        self.publisher = publisher
        self.step = 0
        self.version = 0
        self.positions: dict[int, int] = {}       # partition -> next offset to read
        self.seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.first_version: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._unpublished_requests: list[str] = []
        self.stats = collections.Counter()        # samples, trained, duplicates, bad, steps, ...
        self.by_version: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.last_losses: dict[str, float] = {}
        self.trained_keys: collections.deque = collections.deque(maxlen=100_000)  # (request_id, item_id)
        self.sample_observers: list = []          # actors with observe_samples(samples) (drift monitor)
        self.started_at = time.time()
        self._trained_log: collections.deque = collections.deque(maxlen=10_000)   # (monotonic t, samples)
        self._last_publish_t = 0.0
        self._steps_since_publish = 0
        self._lock = threading.RLock()

        checkpoint = self.store.latest() if resume else None
        self.resumed_from = checkpoint[0]["path"] if checkpoint else None
        if checkpoint:
            manifest, files = checkpoint
            self.tokenizer = SemanticTokenizer.from_tensors(files["tokenizer"])
            self.model = LazyDecoder(self.model_cfg)
            self.model.load_state_dict(files["model"])
        else:
            self.tokenizer, self.model = self._initial_model(tokenizer)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        if checkpoint:
            load_optimizer(self.optimizer, files["optimizer"], manifest["param_groups"])
            self.step = int(manifest["step"])
            self.version = int(manifest["version"])
            if not fresh_topics:
                self.positions = {int(p): int(o) for p, o in manifest["offsets"].items()}
            self.seen.update((int(k), None) for k in files["seen"]["keys"].tolist())
            log.info("learner resumed from %s (step %d, version %d)", self.resumed_from, self.step, self.version)
        if self.publisher is not None:
            self.publisher.version = max(self.publisher.version, self.version)
        self.consumer = self._make_consumer()

    # ---- set-up --------------------------------------------------------------------------------
    def _initial_model(self, tokenizer: SemanticTokenizer | None) -> tuple[SemanticTokenizer, LazyDecoder]:
        """Weights and tokenizer of `loop.init_from` (a pretraining checkpoint) if there is one, else
        `tokenizer` (or one fitted now on the KuaiRand catalogue) and a randomly initialised model."""
        pretrained = CheckpointStore(self.loop_cfg.init_from).latest() if self.loop_cfg.init_from else None
        model = LazyDecoder(self.model_cfg)
        if pretrained is not None and "model" in pretrained[1] and "tokenizer" in pretrained[1]:
            manifest, files = pretrained
            model.load_state_dict(files["model"])
            log.info("learner starts from %s", manifest["path"])
            return SemanticTokenizer.from_tensors(files["tokenizer"]), model
        return tokenizer if tokenizer is not None else default_tokenizer(self.model_cfg), model

    def _make_consumer(self):
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(group_id=self.loop_cfg.consumer_group, enable_auto_commit=False,
                                 auto_offset_reset="earliest", client_id=f"{self.cfg.stream.namespace}-learner",
                                 max_poll_records=self.loop_cfg.micro_batch,
                                 **self.cfg.stream.client_options())
        deadline = time.monotonic() + 30.0
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            if time.monotonic() > deadline:
                consumer.close()
                raise RuntimeError(f"topic {self.topic!r} has no partitions (run `onerec topics` first)")
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)   # one learner owns all partitions; the group id is for offsets
        if self.positions:
            # Resuming: the checkpoint's positions become the group's committed offsets (the consumer
            # would otherwise reset to the crashed process's later commits), then seek to them. A
            # partition the checkpoint does not know (added since) starts at its beginning.
            for tp in tps:
                if tp.partition not in self.positions:
                    consumer.seek_to_beginning(tp)
                    self.positions[tp.partition] = consumer.position(tp)
            self.consumer = consumer
            self._commit()
            for tp in tps:
                consumer.seek(tp, self.positions[tp.partition])
        else:
            # Fresh start: the group's committed offsets (or the beginning); recorded for checkpoints.
            self.positions = {tp.partition: consumer.position(tp) for tp in tps}
        return consumer

    def close(self) -> None:
        self.consumer.close()

    # ---- one step ------------------------------------------------------------------------------
    def poll_batch(self) -> list:
        """Up to `loop.micro_batch` records, waiting at most `loop.max_batch_wait_s`."""
        records: list = []
        deadline = time.monotonic() + self.loop_cfg.max_batch_wait_s
        while len(records) < self.loop_cfg.micro_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = self.consumer.poll(timeout_ms=max(1, int(left * 1000)),
                                        max_records=self.loop_cfg.micro_batch - len(records))
            for batch in polled.values():
                records.extend(batch)
        return records

    def _decode(self, records: list) -> list[dict]:
        """Valid, not yet seen samples with a semantic id; everything else is counted and skipped."""
        samples = []
        for record in records:
            try:
                sample = schemas.decode_sample(record.value)
            except schemas.SchemaError as exc:
                self.stats["bad"] += 1
                log.warning("samples[%d]@%d skipped: %s", record.partition, record.offset, exc.reason)
                continue
            key = key_hash(sample["request_id"], sample["item_id"])
            if key in self.seen:
                self.stats["duplicates"] += 1
                continue
            self.seen[key] = None
            if len(self.seen) > SEEN_KEYS:
                self.seen.popitem(last=False)
            if sample["semantic_id"] is None:   # legacy traffic: tokenize the item ourselves
                codes, known = self.tokenizer.lookup([sample["item_id"]])
                if not known[0]:
                    self.stats["unknown_items"] += 1
                    continue
                sample["semantic_id"] = codes[0].tolist()
            if max(sample["semantic_id"]) >= self.model_cfg.codebook_size:
                self.stats["bad"] += 1
                log.warning("sample %s/%s skipped: semantic_id %s outside the codebook",
                            sample["request_id"], sample["item_id"], sample["semantic_id"])
                continue
            samples.append(sample)
        return samples

    def train_step(self) -> dict | None:
        """Poll, train on what came, commit, maybe checkpoint and publish. None when nothing came."""
        records = self.poll_batch()
        if not records:
            self.maybe_publish()
            return None
        samples = self._decode(records)
        result: dict[str, Any] = {"records": len(records), "samples": len(samples)}
        samples = self._featurizable(samples)
        if samples:
            with self._lock:
                try:
                    step_result = self._optimize(samples)
                except (RuntimeError, ValueError) as exc:   # a batch the model cannot take: skip it, loudly
                    self.stats["failed_batches"] += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    log.warning("batch of %d samples skipped, the model failed on it: %s", len(samples), exc)
                    step_result = None
            if step_result is None:
                samples = []
            else:
                result.update(step_result)
        for record in records:
            self.positions[record.partition] = max(self.positions.get(record.partition, 0), record.offset + 1)
        self._commit()
        self.stats["records"] += len(records)
        if samples:
            with self._lock:
                self.step += 1
                self.stats["steps"] += 1
                self.stats["trained"] += len(samples)
                self._trained_log.append((time.monotonic(), len(samples)))
                self._steps_since_publish += 1
                self._unpublished_requests.extend(s["request_id"] for s in samples)
                self.trained_keys.extend((s["request_id"], s["item_id"]) for s in samples)
            for observer in self.sample_observers:   # fire and forget: observers never slow training
                observer.observe_samples.remote(samples)
            if self.step % self.loop_cfg.checkpoint_every_steps == 0:
                self.checkpoint()
        self.maybe_publish()
        result["step"] = self.step
        return result

    def _featurizable(self, samples: list[dict]) -> list[dict]:
        """Drop (and count) samples whose context the featurizer rejects, naming the reason."""
        if not samples:
            return samples
        try:
            build_context_batch([s["context"] for s in samples], self.tokenizer, self.model_cfg)
            return samples
        except ValueError:
            pass
        kept = []
        for sample in samples:
            try:
                build_context_batch([sample["context"]], self.tokenizer, self.model_cfg)
                kept.append(sample)
            except ValueError as exc:
                self.stats["bad"] += 1
                log.warning("sample %s/%s skipped: %s", sample["request_id"], sample["item_id"], exc)
        return kept

    def _optimize(self, samples: list[dict]) -> dict[str, float] | None:
        contexts = [s["context"] for s in samples]
        ctx = build_context_batch(contexts, self.tokenizer, self.model_cfg).to(self.device)
        target = torch.tensor([s["semantic_id"] for s in samples], dtype=torch.long, device=self.device)  # (B, 3)
        adv = self._advantages(samples).to(self.device)                                                   # (B,)
        train_cfg = self.cfg.train
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            gen = self.model.loss(ctx, target)                                   # eq. 10, every exposure
            loss = train_cfg.sft_weight * gen
            rl = torch.zeros((), device=self.device)
            rows = torch.nonzero(adv != 0).flatten()
            if train_cfg.algorithm != "sft" and len(rows):
                logp = self.model.item_logprob(ctx.index_select(rows), target[rows])   # (R,)
                logp_old = torch.tensor([s["logprob"] if s["logprob"] is not None else float("nan")
                                         for s in (samples[i] for i in rows.tolist())],
                                        dtype=torch.float32, device=self.device)
                if train_cfg.algorithm == "gbpo":
                    rl = gbpo_loss(logp, logp_old, adv[rows])                    # eqs. 11-12
                else:
                    rl = ecpo_loss(logp, logp_old, adv[rows], eps=train_cfg.ecpo_eps,
                                   delta=train_cfg.ecpo_delta)                   # eqs. 13-14
                loss = loss + train_cfg.rl_weight * rl
        if not torch.isfinite(loss):   # skip the step rather than poison the weights; counted and logged
            self.stats["nonfinite_steps"] += 1
            log.warning("non-finite loss at step %d (gen=%s rl=%s): step skipped", self.step,
                        gen.detach().item(), rl.detach().item())
            return None
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train_cfg.grad_clip)
        self.optimizer.step()
        self._account(samples, adv)
        self.last_losses = {"loss": loss.item(), "gen": gen.item(), "rl": rl.item()}
        return {**self.last_losses, "positives": int((adv > 0).sum()), "negatives": int((adv < 0).sum())}

    def _advantages(self, samples: list[dict]) -> torch.Tensor:
        """A per sample: streaming.reward.advantages over those with feedback, 0 for the rest."""
        adv = np.zeros(len(samples), dtype=np.float32)
        with_feedback = [i for i, s in enumerate(samples) if s["feedback"] is not None]
        if with_feedback:
            q = np.array([samples[i]["q"] for i in with_feedback], dtype=np.float64)
            dislike = np.array([samples[i]["feedback"]["dislike"] for i in with_feedback], dtype=bool)
            adv[with_feedback] = advantages(q, dislike, top_fraction=0.25)
        return torch.from_numpy(adv)

    def _account(self, samples: list[dict], adv: torch.Tensor) -> None:
        """Per served version: what the users did with what that version recommended."""
        for sample, a in zip(samples, adv.tolist()):
            c = self.by_version[sample["model_version"]]
            c["samples"] += 1
            fb = sample["feedback"]
            if fb is not None:
                c["feedback"] += 1
                c["positives"] += a > 0
                c["dislikes"] += bool(fb["dislike"])
                c["play_time_ms"] += int(1000 * fb["play_time_s"])

    def _commit(self) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in self.positions.items()}
        if offsets:
            self.consumer.commit(offsets)

    # ---- checkpoints and publishing ------------------------------------------------------------
    def checkpoint(self) -> str:
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        files = {"model": self.model.state_dict(), "optimizer": opt_tensors,
                 "tokenizer": self.tokenizer.to_tensors(),
                 "seen": {"keys": torch.tensor(list(self.seen), dtype=torch.int64)}}
        manifest = {"step": self.step, "version": self.version,
                    "offsets": {str(p): o for p, o in self.positions.items()}, "topic": self.topic,
                    "param_groups": groups, "model_config": asdict(self.model_cfg),
                    "algorithm": self.cfg.train.algorithm}
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
            self.version = weights.version
            self._last_publish_t = time.monotonic()
            self._steps_since_publish = 0
            for request_id in self._unpublished_requests:
                self.first_version.setdefault(request_id, self.version)
            self._unpublished_requests.clear()
            while len(self.first_version) > VERSION_INDEX:
                self.first_version.popitem(last=False)
            self.stats["publishes"] += 1
            return self.version

    def status(self) -> dict:
        with self._lock:
            window = min(RATE_WINDOW_S, max(time.time() - self.started_at, 1e-9))
            recent = sum(n for t, n in self._trained_log if t >= time.monotonic() - window)
            replica_versions = self.publisher.replica_versions() if self.publisher is not None else {}
            return {"step": self.step, "version": self.version, "stats": dict(self.stats),
                    "samples_per_s": recent / window, "losses": dict(self.last_losses),
                    "by_version": {v: dict(c) for v, c in self.by_version.items()},
                    "replica_versions": replica_versions,
                    "published_at": self.publisher.latest.published_at if self.publisher and self.publisher.latest else None,
                    "publish_errors": self.publisher.errors()[-5:] if self.publisher else [],
                    "resumed_from": self.resumed_from, "positions": dict(self.positions)}


# ---------------------------------------------------------------------------------------------
# Ray wrapper
# ---------------------------------------------------------------------------------------------
@ray.remote(max_concurrency=4)
class LearnerActor:
    """Runs `OnlineLearner.train_step` in a loop on its own thread; other calls answer meanwhile."""

    def __init__(self, cfg, *, resume: bool = True, fresh_topics: bool = False, torch_threads: int = 1):
        from actors.publisher import WeightPublisher

        torch.set_num_threads(torch_threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
        self.learner = OnlineLearner(cfg, publisher=WeightPublisher(keep_versions=cfg.loop.versions_kept),
                                     resume=resume, fresh_topics=fresh_topics)
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
        with self.learner._lock:
            versions = ray.get([h.version.remote() for h in handles], timeout=60)
            publisher = self.learner.publisher
            publisher.version = max([publisher.version, *versions])
            publisher.set_replicas(handles, versions)
            if publisher.latest is None or publisher.latest.version < publisher.version:
                # replicas serve a version newer than ours (we restarted from a checkpoint): push our
                # weights under a newer number, so every replica serves them and versions stay forward
                self.learner.publish()
        return len(handles)

    def add_observer(self, handle) -> None:
        """An actor that gets every version (apply_weights) and every trained sample (observe_samples)."""
        with self.learner._lock:
            self.learner.publisher.add_observer(handle)
            self.learner.sample_observers.append(handle)

    def rollback(self, to_version: int) -> int:
        """Serve `to_version`'s weights again under a new version number and train on from them."""
        from actors.publisher import unpack_weights

        with self.learner._lock:
            kept = self.learner.publisher.history.get(int(to_version))
            if kept is None:
                raise ValueError(f"cannot roll back to version {to_version}: no longer kept")
            self.learner.model.load_state_dict(unpack_weights(ray.get(kept.ref)))
            self.learner.optimizer.state.clear()     # moments of the abandoned weights do not apply
            weights = self.learner.publisher.republish(int(to_version))
            self.learner.version = weights.version
            self.learner.stats["rollbacks"] += 1
            log.warning("rolled back to version %d, served as version %d", to_version, weights.version)
            return weights.version

    def run(self, max_steps: int | None = None) -> dict:
        """Train until `stop()` (or max_steps); returns the final status. Errors end the loop, loudly."""
        try:
            while not self._stop.is_set():
                self.learner.train_step()
                if max_steps is not None and self.learner.step >= max_steps:
                    break
            with self.learner._lock:
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
        with self.learner._lock:
            return self.learner.checkpoint()

    def version_for(self, request_ids: list[str]) -> dict[str, int]:
        """First published version whose training included each request (freshness bench)."""
        with self.learner._lock:
            return {r: self.learner.first_version[r] for r in request_ids if r in self.learner.first_version}

    def status(self) -> dict:
        status = self.learner.status()
        status["error"] = self._error
        return status

    def health(self) -> dict:
        return {"step": self.learner.step, "version": self.learner.version, "error": self._error}
