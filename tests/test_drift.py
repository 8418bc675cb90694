"""The drift monitor: records per version, alerts on forced drift, rollback to the last accepted
version (in-process and through Ray), and the `onerec drift` table and plot."""
import json
import time

import numpy as np
import pytest
import torch

from actors.drift import DriftConfig, DriftMonitor, drift_table, read_drift_log
from learner.config import ModelConfig
from learner.model import LazyDecoder
from learner.synthetic import random_catalogue, random_context
from onerec import cli


@pytest.fixture(scope="module")
def world():
    cfg = ModelConfig.from_name("tiny")
    item_ids, _emb, tokenizer = random_catalogue(300, codebook_size=16, seed=0)
    rng = np.random.default_rng(0)
    probe = [random_context(rng, cfg, item_ids, n_short=5, n_long=10) for _ in range(16)]
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in LazyDecoder(cfg).state_dict().items()}
    return cfg, item_ids, tokenizer, probe, base


def drifted(state: dict) -> dict:
    """Scramble the output heads: a version that recommends something else entirely."""
    gen = torch.Generator().manual_seed(1)
    out = {k: v.clone() for k, v in state.items()}
    for k in out:
        if k.startswith("heads."):
            out[k] = torch.randn(out[k].shape, generator=gen) * 5.0
    return out


def sample(version: int, item: int, *, dislike: bool, q: float, play: float = 10.0) -> dict:
    return {"request_id": f"r{version}-{item}", "user_id": 1, "item_id": int(item), "model_version": version,
            "feedback": {"play_time_s": play, "dislike": dislike}, "q": q}


def test_forced_drift_alerts_and_rolls_back(world, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    calls = []
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "drift.jsonl"), rollback=True),
                           on_rollback=calls.append)
    first = monitor.on_weights(1, base)
    assert first["kl"] is None and len(first["entropy"]) == 3
    assert 0.0 <= first["invalid_share"] <= 1.0
    assert all(0 < h <= np.log(cfg.codebook_size) + 1e-6 for h in first["entropy"])

    same = monitor.on_weights(2, base)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["kl_level1"] == pytest.approx(0.0, abs=1e-6)
    assert same["alerts"] == [] and calls == []

    bad = monitor.on_weights(3, drifted(base))
    assert bad["kl"] > monitor.cfg.kl_threshold
    assert [a["kind"] for a in bad["alerts"]] == ["kl"]
    assert bad["rolled_back_to"] == 2 and calls == [2]

    # the publisher re-publishes version 2's weights as version 4: compared with 2, not with 3
    again = monitor.on_weights(4, base)
    assert again["reference_version"] == 2 and again["alerts"] == [] and calls == [2]

    with pytest.raises(ValueError, match="not newer"):
        monitor.on_weights(4, base)

    lines = read_drift_log(tmp_path / "drift.jsonl")
    assert [r["version"] for r in lines] == [1, 2, 3, 4]


def test_dislike_share_alert_on_what_was_served(world, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    calls = []
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "d.jsonl"), rollback=True,
                                                              served_window=100, min_served=50),
                           trained_items=item_ids[:150], on_rollback=calls.append)
    monitor.on_weights(1, base)
    good = [sample(1, item_ids[i % 150], dislike=False, q=0.9 if i % 2 else 0.2, play=20.0) for i in range(100)]
    (rec,) = monitor.observe_samples(good)
    assert rec["kind"] == "served" and rec["alerts"] == []
    assert rec["positive_share"] == pytest.approx(0.5)
    assert rec["dislike_share"] == 0.0 and rec["mean_play_time_s"] == pytest.approx(20.0)
    assert rec["cold_start_share"] == 0.0
    assert rec["coverage"] == pytest.approx(100 / 300)

    monitor.on_weights(2, base)
    bad = [sample(2, item_ids[150 + i % 50], dislike=i % 5 == 0, q=0.1) for i in range(60)]
    assert monitor.observe_samples(bad) == []          # window not full yet
    (rec,) = monitor.flush()
    assert rec["version"] == 2 and rec["n"] == 60
    assert rec["dislike_share"] == pytest.approx(0.2)
    assert rec["cold_start_share"] == pytest.approx(1.0)  # items 150..199 were never trained on
    assert [a["kind"] for a in rec["alerts"]] == ["dislike"]
    assert calls == [1]
    assert monitor.reference_version() == 1


def test_collapse_alerts_after_consecutive_narrow_windows_only(world, tmp_path):
    """Served windows concentrated on a few items raise a collapse alert at the N-th in a row; a spread
    window in between resets the count."""
    cfg, item_ids, tokenizer, probe, base = world
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "c.jsonl"), served_window=100,
                                                              min_served=50, collapse_versions=3))
    narrow = lambda v: [sample(v, item_ids[i % 4], dislike=False, q=0.5) for i in range(100)]   # noqa: E731
    spread = lambda v: [sample(v, item_ids[i], dislike=False, q=0.5) for i in range(100)]       # noqa: E731
    kinds = []
    for version, window in enumerate([narrow, narrow, spread, narrow, narrow, narrow], start=1):
        (rec,) = monitor.observe_samples(window(version))
        kinds.append([a["kind"] for a in rec["alerts"]])
        assert rec["distinct_share"] == pytest.approx(0.04 if window is narrow else 1.0)
    assert kinds == [[], [], [], [], [], ["collapse"]]


def test_no_rollback_unless_configured(world, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    calls = []
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "d.jsonl")),
                           on_rollback=calls.append)
    monitor.on_weights(1, base)
    rec = monitor.on_weights(2, drifted(base))
    assert rec["alerts"] and rec["rolled_back_to"] is None and calls == []


def test_drift_command_prints_table_and_writes_plot(world, tmp_path, capsys):
    cfg, item_ids, tokenizer, probe, base = world
    path = tmp_path / "drift.jsonl"
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(path), rollback=True),
                           on_rollback=lambda v: None)
    monitor.on_weights(1, base)
    monitor.observe_samples([sample(1, item_ids[i], dislike=False, q=0.8) for i in range(30)])
    monitor.on_weights(2, drifted(base))
    monitor.flush()
    rows = drift_table(read_drift_log(path))
    assert [r["version"] for r in rows] == [1, 2]
    assert rows[0]["n"] == 30 and rows[1]["alerts"] == ["kl"] and rows[1]["rolled_back_to"] == 1

    plot = tmp_path / "drift.png"
    assert cli.main(["drift", str(path), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "rolled back to 1" in out and "KL" in out
    assert plot.stat().st_size > 10_000
    assert cli.main(["drift", str(path), "--plot", str(plot), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["version"] == 2


def test_drift_command_names_a_bad_log(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "probe", "version": 1}\nnot json\n')
    assert cli.main(["drift", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err


@pytest.mark.integration
def test_drift_actor_gets_weights_like_a_replica_and_asks_for_rollback(world, tmp_path, ray_session):
    ray = ray_session
    from actors.drift import DriftMonitorActor
    from actors.publisher import checksum_of, pack_weights
    from learner.tokenizer import tokenizer_bytes

    cfg, item_ids, tokenizer, probe, base = world

    @ray.remote
    class RollbackRecorder:
        def __init__(self):
            self.calls = []

        def rollback(self, to_version):
            self.calls.append(to_version)

        def seen(self):
            return list(self.calls)

    recorder = RollbackRecorder.remote()
    actor = DriftMonitorActor.remote(cfg, tokenizer_bytes(tokenizer), probe,
                                     DriftConfig(log_path=str(tmp_path / "a.jsonl"), rollback=True),
                                     rollback_target=recorder)
    for version, state in ((1, base), (2, drifted(base))):
        packed = pack_weights(state)
        applied = actor.apply_weights.remote(version, ray.put(packed), checksum_of(packed))
        assert ray.get(applied, timeout=120) == version
    packed = pack_weights(base)
    with pytest.raises(ray.exceptions.RayTaskError, match="checksum"):
        ray.get(actor.apply_weights.remote(3, packed, checksum_of(packed) ^ 1), timeout=60)
    assert ray.get(actor.rollbacks_requested.remote(), timeout=30) == [1]
    for _ in range(100):
        if ray.get(recorder.seen.remote(), timeout=30) == [1]:
            break
        time.sleep(0.1)
    assert ray.get(recorder.seen.remote(), timeout=30) == [1]
    assert [r["version"] for r in read_drift_log(tmp_path / "a.jsonl")] == [1, 2]
    ray.kill(actor)
    ray.kill(recorder)
