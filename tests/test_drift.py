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
    assert {"kl", "kl_level1"} <= {a["kind"] for a in bad["alerts"]}
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
    assert kinds == [[], [], [], [], [], ["collapse", "top_share"]]   # 4 items hold every request's top


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
    assert rows[0]["n"] == 30 and "kl" in rows[1]["alerts"] and rows[1]["rolled_back_to"] == 1

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


# ---- the estimators (actors/drift_signals.py) against closed forms -------------------------------------
def test_k1_and_k3_equal_the_kl_in_expectation_and_k3_is_never_negative():
    """x ~ p_old with counts proportional to p_old: the sample mean IS the expectation, so both
    estimators must give KL(p_old || p_new) exactly; Monte Carlo draws agree within 4 standard errors."""
    from actors.drift_signals import kl_estimators

    counts = np.array([5, 3, 1, 1])
    p_old, p_new = counts / counts.sum(), np.array([0.1, 0.2, 0.3, 0.4])
    kl = float(np.sum(p_old * np.log(p_old / p_new)))
    x = np.repeat(np.arange(4), counts)                        # the exact expectation over p_old
    est = kl_estimators(np.log(p_old[x]), np.log(p_new[x]))
    assert est["k1"] == pytest.approx(kl, rel=1e-12) and est["k3"] == pytest.approx(kl, rel=1e-12)
    assert est["n"] == 10

    rng = np.random.default_rng(0)
    draws = rng.choice(4, size=20_000, p=p_old)
    log_r = np.log(p_new[draws]) - np.log(p_old[draws])
    mc = kl_estimators(np.log(p_old[draws]), np.log(p_new[draws]))
    assert abs(mc["k1"] - kl) < 4 * (-log_r).std() / np.sqrt(len(draws))
    assert abs(mc["k3"] - kl) < 4 * (np.expm1(log_r) - log_r).std() / np.sqrt(len(draws))
    # per sample: k1 can be negative (r > 1), k3 never is, for r below and above 1
    singles = [kl_estimators([np.log(p_old[i])], [np.log(p_new[i])]) for i in range(4)]
    assert min(s["k1"] for s in singles) < 0 and all(s["k3"] >= 0 for s in singles)
    same = kl_estimators(np.log(p_old[x]), np.log(p_old[x]))
    assert same["k1"] == 0.0 and same["k3"] == 0.0
    # served items come from the beam: x ~ q = p_old renormalised over a subset. k1 then estimates
    # KL(q || p_new) - KL(q || p_old) exactly (the subset's mass cancels); k3 is biased by E_q[r] != 1
    beam = np.array([0, 1, 2])
    q = p_old[beam] / p_old[beam].sum()
    kl_q = lambda p: float(np.sum(q * np.log(q / p[beam])))                 # noqa: E731
    weights = np.round(q * 90).astype(int)                                   # q = (5, 3, 1) / 9 exactly
    xb = np.repeat(beam, weights)
    est_b = kl_estimators(np.log(p_old[xb]), np.log(p_new[xb]))
    assert est_b["k1"] == pytest.approx(kl_q(p_new) - kl_q(p_old), rel=1e-9)
    mean_r = float(np.sum(q * p_new[beam] / p_old[beam]))
    assert est_b["k3"] == pytest.approx(mean_r - 1 + est_b["k1"], rel=1e-9) and mean_r != pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        kl_estimators([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="finite"):
        kl_estimators([-np.inf], [-1.0])


def test_top_item_share_counts_requests_whose_top_item_is_most_served():
    from actors.drift_signals import top_item_share

    # requests a, b, c: top items (highest logprob) 1, 1, 3; the most served item is 1 (4 exposures)
    rids = ["a", "a", "b", "b", "c", "c", "d"]
    items = [1, 2, 1, 2, 3, 1, 4]
    lps = [-0.1, -2.0, -0.5, -0.4, -0.2, -3.0, None]           # b's top is item 2 (-0.4 > -0.5)
    assert top_item_share(rids, items, lps, top_n=1) == pytest.approx(1 / 4)   # only a's top is item 1
    assert top_item_share(rids, items, lps, top_n=2) == pytest.approx(2 / 4)   # items 1 and 2
    assert top_item_share([], [], [], top_n=3) is None
    with pytest.raises(ValueError, match="top_n"):
        top_item_share(rids, items, lps, top_n=0)


# ---- alerts: a constructed fault fires, a healthy sequence does not -----------------------------------
def served_by(model, state, tokenizer, contexts, version, rng_seed, *, per_request=3, beam=16):
    """Samples as the replicas serve them: draws from the beam (temperature 1), with their log pi_old."""
    from learner.beam import beam_search, sample_from_beam
    from learner.features import build_context_batch

    model.load_state_dict(state)
    ctx = build_context_batch(contexts, tokenizer, model.cfg)
    with torch.no_grad():
        recs = beam_search(model.eval(), ctx, tokenizer.trie(), beam_width=beam, top_k=beam)
    recs = sample_from_beam(recs, top_k=per_request, temperature=1.0, generator=torch.Generator().manual_seed(rng_seed))
    out = []
    for row, context in enumerate(contexts):
        for item, sid, lp in zip(recs.item_ids[row].tolist(), recs.semantic_ids[row].tolist(),
                                 recs.logprobs[row].tolist()):
            out.append({"request_id": f"v{version}-{rng_seed}-{row}", "user_id": row, "item_id": item,
                        "model_version": version, "source": "onerec", "context": context, "semantic_id": sid,
                        "logprob": lp, "feedback": {"play_time_s": 10.0, "dislike": False}, "q": 0.5})
    return out


def nudged(state: dict, seed: int, scale: float = 1e-3) -> dict:
    """A healthy next version: every tensor moved by a small relative step."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()}


@pytest.fixture(scope="module")
def traffic(world):
    cfg, item_ids, tokenizer, probe, base = world
    rng = np.random.default_rng(5)
    return [random_context(rng, cfg, item_ids, n_short=5, n_long=10) for _ in range(48)]


def test_healthy_versions_raise_no_alert_and_served_kl_is_near_zero(world, traffic, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "h.jsonl"), served_window=100,
                                                              min_served=50, cold_start_after=0),
                           trained_items=item_ids)
    server = LazyDecoder(cfg)
    state, records = base, []
    for version in range(1, 8):
        records.append(monitor.on_weights(version, state))
        records += monitor.observe_samples(served_by(server, state, tokenizer, traffic, version, version))
        state = nudged(state, version)
    records += monitor.flush()
    assert [r["alerts"] for r in records] == [[]] * len(records)
    probes = [r for r in records if r["kind"] == "probe"]
    assert probes[0]["kl_k1_prev"] is None                                 # nothing served before v1
    assert [r["kl_prev_version"] for r in probes[1:]] == list(range(1, 7))
    assert [r["kl_ref_version"] for r in probes[1:]] == [1] * 6
    for r in probes[1:]:
        assert r["kl_prev_n"] == len(traffic) * 3
        assert abs(r["kl_k1_prev"]) < 0.05 and 0 <= r["kl_k3_prev"] < 0.05
    served = [r for r in records if r["kind"] == "served"]
    assert all(r["top_share"] is not None and r["top_share"] < monitor.cfg.top_share_max for r in served)


def test_scrambled_head_trips_the_served_kl_and_a_sharpened_head_the_entropy(world, traffic, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    calls = []
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "f.jsonl"), rollback=True),
                           trained_items=item_ids, on_rollback=calls.append)
    server = LazyDecoder(cfg)
    monitor.on_weights(1, base)
    monitor.observe_samples(served_by(server, base, tokenizer, traffic, 1, 1))
    same = monitor.on_weights(2, base)                      # the same policy: the estimates read ~0
    assert abs(same["kl_k1_prev"]) < 1e-4 and same["kl_k3_prev"] < 1e-4 and same["alerts"] == []
    bad = monitor.on_weights(3, drifted(base))
    kinds = {a["kind"] for a in bad["alerts"]}
    assert bad["kl_k1_prev"] > monitor.cfg.kl_k1_prev_threshold and {"k1_prev", "k1_ref"} <= kinds
    assert "k3_prev" not in kinds and bad["kl_k3_prev"] >= 0      # recorded; alerts only with a threshold
    assert bad["kl_prev_version"] == 1 and bad["rolled_back_to"] == 2 and calls == [2]
    sharp = {k: v * 1000.0 if k.startswith("heads.") else v for k, v in base.items()}   # all mass on one code
    rec = monitor.on_weights(4, sharp)
    assert "entropy" in {a["kind"] for a in rec["alerts"]} and min(rec["entropy"]) < monitor.cfg.entropy_min
    monitor.cfg.kl_k3_prev_threshold = 2.0
    assert "k3_prev" in {a["kind"] for a in monitor.on_weights(5, drifted(base))["alerts"]}


def test_collapsed_serving_trips_coverage_top_share_and_cold_start(world, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "s.jsonl"), served_window=100,
                                                              min_served=50, collapse_versions=2,
                                                              coverage_min=0.05, cold_start_after=100),
                           trained_items=item_ids[:150])
    spread = [sample(1, item_ids[i], dislike=False, q=0.5) for i in range(100)]
    (first,) = monitor.observe_samples(spread)
    assert first["alerts"] == [] and first["top_share"] == pytest.approx(0.1)
    kinds = []
    for version in (2, 3):
        window = [dict(sample(version, item_ids[i % 3], dislike=False, q=0.5), request_id=f"q{version}-{i}")
                  for i in range(100)]
        (rec,) = monitor.observe_samples(window)
        kinds.append({a["kind"] for a in rec["alerts"]})
    assert kinds[0] == set()                                 # one narrow window is not a collapse yet
    assert {"coverage", "top_share", "collapse"} <= kinds[1]
    cold = [dict(sample(4, item_ids[150 + i], dislike=False, q=0.5), request_id=f"c{i}") for i in range(100)]
    (rec,) = monitor.observe_samples(cold)
    assert "cold_start" in {a["kind"] for a in rec["alerts"]} and rec["cold_start_share"] == 1.0


def test_legacy_samples_are_not_the_policys_exposures(world, tmp_path):
    cfg, item_ids, tokenizer, probe, base = world
    monitor = DriftMonitor(cfg, tokenizer, probe, DriftConfig(log_path=str(tmp_path / "l.jsonl"), served_window=10))
    legacy = [dict(sample(0, item_ids[0], dislike=False, q=0.5), source="legacy") for _ in range(20)]
    assert monitor.observe_samples(legacy) == [] and monitor.flush() == []
    ours = [dict(sample(1, item_ids[i], dislike=False, q=0.5), source="onerec") for i in range(10)]
    (rec,) = monitor.observe_samples(legacy + ours)
    assert rec["version"] == 1 and rec["n"] == 10
