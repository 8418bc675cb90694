"""The KuaiRand user simulator: its API, its fit to the log within the documented tolerances, and
its response to relevance."""
import numpy as np
import pytest

from simulator import kuairand
from simulator.config import SimulatorConfig
from simulator.fit import check_against_log, fit_params, tolerance_failures
from simulator.users import UserSimulator, flags_of_response


@pytest.fixture(scope="module")
def log():
    return kuairand.read_log()


@pytest.fixture()
def sim():
    return UserSimulator.default(seed=0)


def test_default_loads_catalogue_and_users(sim):
    assert len(sim.item_ids) == len(sim.durations_s) >= 5000
    assert (sim.durations_s > 0).all()
    assert len(sim.user_ids) > 20_000
    assert len(np.unique(sim.item_ids)) == len(sim.item_ids)


def test_respond_returns_the_interface_fields(sim):
    user, item = int(sim.user_ids[0]), int(sim.item_ids[0])
    r = sim.respond(user, item)
    assert set(r) == {"play_time_s", "like", "dislike", "follow", "comment", "forward", "collect"}
    assert isinstance(r["play_time_s"], float) and r["play_time_s"] >= 0
    assert all(isinstance(r[k], bool) for k in r if k != "play_time_s")


def test_same_seed_same_responses():
    a, b = UserSimulator.default(seed=3), UserSimulator.default(seed=3)
    users = a.user_ids[:50]
    items = a.item_ids[:50]
    ra = [a.respond(int(u), int(v))["play_time_s"] for u, v in zip(users, items)]
    rb = [b.respond(int(u), int(v))["play_time_s"] for u, v in zip(users, items)]
    assert ra == rb


def test_respond_equals_respond_batch_of_one_pair():
    """The scalar path and the vectorized path are the same model (same draws, same seed)."""
    a, b = UserSimulator.default(seed=5), UserSimulator.default(seed=5)
    rng = np.random.default_rng(0)
    for user, item in zip(rng.choice(a.user_ids, 300), rng.choice(a.item_ids, 300)):
        one = a.respond(int(user), int(item))
        batch = b.respond_batch(np.array([user]), np.array([item]))
        assert one["play_time_s"] == pytest.approx(float(batch["play_time_s"][0]), rel=1e-4, abs=1e-4)
        assert all(one[k] == bool(batch[k][0]) for k in one if k != "play_time_s")


def test_unknown_user_or_item_is_a_named_error(sim):
    with pytest.raises(ValueError, match="user_id"):
        sim.respond(-5, int(sim.item_ids[0]))
    with pytest.raises(ValueError, match="item_id"):
        sim.respond(int(sim.user_ids[0]), -7)


def test_context_is_warm_started_and_observe_updates_it(sim):
    user = int(sim.user_ids[10])
    ctx = sim.context(user)
    assert set(ctx) == {"profile", "short", "long"}
    assert len(ctx["profile"]) == kuairand.PROFILE_FIELDS
    for part in ("short", "long"):
        lengths = {len(ctx[part][k]) for k in ("item_id", "duration_s", "play_time_s", "flags")}
        assert len(lengths) == 1
    item = int(sim.item_ids[123])
    r = sim.respond(user, item)
    flags = flags_of_response(r, sim.duration_of(item))
    sim.observe(user, item, sim.duration_of(item), r["play_time_s"], flags)
    ctx2 = sim.context(user)
    assert ctx2["short"]["item_id"][-1] == item
    assert ctx2["short"]["play_time_s"][-1] == pytest.approx(r["play_time_s"])
    assert ctx2["short"]["flags"][-1] == flags


def test_shipped_params_reproduce_the_log_within_tolerances(capsys):
    """`onerec simulator --check-only`: play-time quantiles per duration bucket, like rate and dislike
    rate of the shipped artifact against the log (tolerances: SimulatorConfig)."""
    import json

    from onerec import cli

    assert cli.main(["simulator", "--check-only", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failures"] == []
    assert len(report["buckets"]) >= 6
    assert report["rows"] >= 90_000
    assert abs(report["sim_like_rate"] - report["log_like_rate"]) < 0.1 * report["log_like_rate"]


def test_tolerance_check_can_fail(log):
    """A simulator that ignores the fitted play-time law is caught by the same check."""
    cfg = SimulatorConfig()
    sim = UserSimulator.default(seed=0, cfg=cfg)
    sim.params.ratio_quantiles = sim.params.ratio_quantiles * 0.5
    report = check_against_log(sim, log, rows=10_000, seed=1)
    assert any("p75" in f for f in tolerance_failures(report, cfg))


def test_fit_on_part_of_the_log_reproduces_that_part(log):
    part = log.slice(0, 30_000)
    cfg = SimulatorConfig(relevance_strength=-1.0)
    sim = UserSimulator(fit_params(part, cfg), cfg)
    report = check_against_log(sim, part, rows=20_000, seed=2)
    assert tolerance_failures(report, SimulatorConfig(tol_dislike_rate_rel=1.0)) == []


def test_videos_close_to_the_history_get_longer_play(sim):
    rng = np.random.default_rng(0)
    close_ratio, random_ratio = [], []
    row_of = {int(v): n for n, v in enumerate(sim.item_ids)}
    for user in rng.choice(sim.user_ids, 150, replace=False):
        rel = np.array([sim.relevance(int(user), int(v)) for v in sim.item_ids[::5]])
        if np.isnan(rel).all():
            continue
        close = sim.item_ids[::5][np.argsort(-rel)[:5]]
        rand = rng.choice(sim.item_ids, 5)
        for items, out in ((close, close_ratio), (rand, random_ratio)):
            r = sim.respond_batch(np.full(len(items), user), items)
            out.extend(r["play_time_s"] / sim.durations_s[[row_of[int(v)] for v in items]])
    assert np.mean(close_ratio) > 1.5 * np.mean(random_ratio)


def _play_after_watching_neighbours(strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Play times of one video for one user, before vs after the user watched 20 videos close to it
    (same seed, so the random draws are identical and only relevance differs)."""
    cfg = SimulatorConfig(relevance_strength=strength)
    before, after = UserSimulator.default(seed=0, cfg=cfg), UserSimulator.default(seed=0, cfg=cfg)
    user, target = int(before.user_ids[7]), int(before.item_ids[100])
    emb = after.params.item_embeddings
    neighbours = after.item_ids[np.argsort(-(emb @ emb[100]))[1:21]]
    for v in neighbours:
        after.observe(user, int(v), after.duration_of(int(v)), 1.0, 0)
    n = 2000
    a = before.respond_batch(np.full(n, user), np.full(n, target))["play_time_s"]
    b = after.respond_batch(np.full(n, user), np.full(n, target))["play_time_s"]
    return a, b


def test_observing_close_videos_lengthens_play_only_through_relevance():
    a, b = _play_after_watching_neighbours(0.3)
    assert np.mean(b) > 1.2 * np.mean(a)
    a0, b0 = _play_after_watching_neighbours(0.0)
    np.testing.assert_allclose(a0, b0)
