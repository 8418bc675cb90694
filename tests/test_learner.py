"""The online learner on a real broker: commits after steps, checkpoints, resumes without retraining."""
import time
import uuid

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from actors.learner import OnlineLearner
from learner.checkpoint import CheckpointStore
from simulator.users import UserSimulator
from streaming import schemas
from streaming.topics import ensure_topics, topic_name
from tests.loop_helpers import loop_config, tokenizer

pytestmark = pytest.mark.integration


def make_samples(n: int, tok, seed: int = 0) -> list[dict]:
    """Samples as the Faust join emits them: context, item, pi_old, feedback and q."""
    rng = np.random.default_rng(seed)
    sim = UserSimulator.default(seed=seed)
    items = tok.item_ids[rng.choice(len(tok.item_ids), size=n)]
    codes = tok.codes_for(items)
    samples = []
    for i in range(n):
        user = int(sim.user_ids[i % 7])
        feedback = None if i % 5 == 4 else {
            "request_id": f"r{i // 2}", "user_id": user, "item_id": int(items[i]), "ts": 1000.0 + i,
            "play_time_s": float(rng.uniform(0, 30)), "dislike": bool(i % 7 == 3)}
        samples.append({"request_id": f"r{i // 2}", "user_id": user, "item_id": int(items[i]), "ts": 1000.0 + i,
                        "model_version": 1 + i // 16, "source": "onerec" if i % 3 else "legacy",
                        "context": sim.context(user), "semantic_id": codes[i].tolist() if i % 3 else None,
                        "duration_s": 20.0, "logprob": float(-rng.uniform(5, 12)) if i % 3 else None,
                        "feedback": feedback, "q": None if feedback is None else float(rng.uniform()),
                        "duration_bucket": 4})
    return samples


def produce(stream_cfg, payloads: list[bytes]) -> None:
    producer = KafkaProducer(**stream_cfg.client_options())
    try:
        for i, value in enumerate(payloads):
            producer.send(topic_name(stream_cfg, "samples"), value, key=f"k{i}".encode(),
                          partition=i % stream_cfg.partitions)
        producer.flush(timeout=30)
    finally:
        producer.close()


def committed(stream_cfg, group: str) -> dict[int, int]:
    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, **stream_cfg.client_options())
    try:
        out = {}
        for p in range(stream_cfg.partitions):
            off = consumer.committed(TopicPartition(topic_name(stream_cfg, "samples"), p))
            if off is not None:
                out[p] = off
        return out
    finally:
        consumer.close()


def run_until(learner: OnlineLearner, *, step: int | None = None, timeout_s: float = 90) -> None:
    """Train until `step`, or (step None) until the consumer reached the end of every partition."""
    end = None
    if step is None:
        end = learner.source.end_offsets()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step is not None and learner.step >= step:
            return
        if end is not None and all(learner.positions.get(p, 0) >= o for p, o in end.items()):
            return
        learner.train_step()
    raise TimeoutError(f"learner did not reach step {step} / offsets {end} in {timeout_s} s "
                       f"(at step {learner.step}, {learner.positions})")


def test_learner_commits_checkpoints_and_resumes_without_retraining(tmp_path, stream_config):
    ensure_topics(stream_config, kinds=("samples",))
    cfg = loop_config(tmp_path, micro_batch=8, checkpoint_every_steps=2, max_batch_wait_s=0.3,
                      consumer_group=f"learner-{uuid.uuid4().hex[:6]}")
    cfg.stream = stream_config
    tok = tokenizer(cfg.model.codebook_size)
    samples = make_samples(60, tok)
    payloads = [schemas.encode_sample(s) for s in samples]
    payloads += [payloads[3], payloads[10], b"{not json", b'{"request_id": "x"}']   # redeliveries + garbage
    produce(stream_config, payloads)
    all_keys = {(s["request_id"], s["item_id"]) for s in samples}

    first = OnlineLearner.from_config(cfg, tokenizer=tok)
    assert first.resumed_from is None
    run_until(first, step=4)                               # checkpoint at step 4
    at_checkpoint = set(first.trained_keys)
    checkpoint_state = {k: v.clone() for k, v in first.model.state_dict().items()}
    run_until(first, step=5)                               # one more step that no checkpoint holds
    assert committed(stream_config, cfg.loop.consumer_group) == first.positions   # committed after the step
    assert all(np.isfinite(v) for v in first.last_losses.values())
    first.close()                                          # "crash": no final checkpoint

    manifest, _ = CheckpointStore(cfg.loop.checkpoint_dir).latest()
    assert manifest["step"] == 4 and set(manifest["files"]) >= {"model.safetensors", "optimizer.safetensors",
                                                                "tokenizer.safetensors"}
    second = OnlineLearner.from_config(cfg)                            # tokenizer and weights come from the checkpoint
    assert second.resumed_from is not None and second.step == 4
    assert {int(p): o for p, o in manifest["offsets"].items()} == second.positions
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, checkpoint_state[name]), name
    assert second.tokenizer.codes_for(tok.item_ids[:50]).tolist() == tok.codes_for(tok.item_ids[:50]).tolist()
    run_until(second)
    again = set(second.trained_keys)
    assert not (again & at_checkpoint), "samples up to the checkpoint were trained again"
    assert at_checkpoint | again == all_keys  # nothing lost
    total_stats = first.counters() + second.counters()
    assert second.counters()["bad"] + first.counters()["bad"] >= 2   # the garbage records were counted, not fatal
    assert total_stats["duplicates"] >= 2                  # redeliveries skipped
    assert second.counters()["nonfinite_steps"] == 0 and all(np.isfinite(v) for v in second.last_losses.values())
    assert second.by_version and sum(c["samples"] for c in second.by_version.values()) == len(again)
    second.close()


@pytest.mark.parametrize("algorithm", ["ecpo", "sft"])
def test_algorithm_switches_train(tmp_path, stream_config, algorithm):
    ensure_topics(stream_config, kinds=("samples",))
    cfg = loop_config(tmp_path, micro_batch=16, max_batch_wait_s=0.5, consumer_group=f"alg-{algorithm}")
    cfg.stream = stream_config
    cfg.train.algorithm = algorithm
    tok = tokenizer(cfg.model.codebook_size)
    produce(stream_config, [schemas.encode_sample(s) for s in make_samples(16, tok, seed=1)])
    learner = OnlineLearner.from_config(cfg, tokenizer=tok)
    try:
        before = {k: v.clone() for k, v in learner.model.state_dict().items()}
        run_until(learner, step=1)
        assert np.isfinite(learner.last_losses["loss"])
        if algorithm == "sft":
            assert learner.last_losses["rl"] == 0.0
        assert any(not torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    finally:
        learner.close()


@pytest.mark.integration
def test_checkpoints_go_to_s3(monkeypatch):
    """The same CheckpointStore on s3:// (moto's S3 server on loopback): save, prune, load the latest."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    from infra.broker import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}"})
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.filesystem("s3").mkdir("ckpt-bucket")
        store = CheckpointStore("s3://ckpt-bucket/loop", keep=2)
        for step in (1, 2, 3):
            store.save(step, {"model": {"w": torch.full((2, 2), float(step))}}, {"step": step})
        manifest, files = store.latest()
        assert manifest["step"] == 3 and files["model"]["w"][0, 0].item() == 3.0
        assert [p.rsplit("/", 1)[-1] for p in store._folders()] == ["step-00000002", "step-00000003"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.mark.parametrize("field, value, message", [
    ("n_replicas", 0, "loop.n_replicas"), ("publish_every_s", 0.0, "loop.publish_every_s"),
    ("top_k", 99, "loop.top_k"), ("micro_batch", 1.5, "loop.micro_batch"),
])
def test_loop_config_rejects_bad_values_by_name(field, value, message):
    from actors.config import LoopConfig

    with pytest.raises(ValueError, match=message):
        LoopConfig(**{field: value})
    cfg = LoopConfig()
    cfg.__post_init__()                  # idempotent: validating twice changes nothing
    assert cfg == LoopConfig()


def test_an_arms_learner_trains_only_on_its_own_arms_samples(tmp_path, stream_config):
    """A/B: samples carry their impression's arm; arm `a`'s learner takes `a`'s and the arm-less ones
    (the legacy traffic of a plain run), never `b`'s, and counts what it skipped."""
    ensure_topics(stream_config, kinds=("samples",))
    cfg = loop_config(tmp_path, micro_batch=8, max_batch_wait_s=0.3, consumer_group=f"arms-{uuid.uuid4().hex[:6]}")
    cfg.stream = stream_config
    tok = tokenizer(cfg.model.codebook_size)
    samples = make_samples(30, tok, seed=2)
    arms = ["a" if i % 3 == 0 else "b" if i % 3 == 1 else None for i in range(len(samples))]
    for sample, arm in zip(samples, arms):
        if arm is not None:
            sample["arm"] = arm
    produce(stream_config, [schemas.encode_sample(s) for s in samples])
    learner = OnlineLearner.from_config(cfg, tokenizer=tok, arm="a")
    try:
        run_until(learner)
        trained = set(learner.trained_keys)
        want = {(s["request_id"], s["item_id"]) for s, arm in zip(samples, arms) if arm in ("a", None)}
        assert trained == want
        assert learner.counters()["other_arm"] == arms.count("b")
    finally:
        learner.close()
