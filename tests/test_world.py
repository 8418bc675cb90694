"""The World: its fit to the log, its predictive check on the held-back day, sessions (patience, exits,
returns), the oracle, arm assignment, the ledger's math and a short arena run that tells policies apart."""
import json

import numpy as np
import pytest

from learner.flags import FLAG_BITS
from simulator import kuairand
from simulator.arena import fixed_policies, run_arena
from simulator.check import auc, check_world, tolerance_report
from simulator.config import SimulatorConfig
from simulator.fit import tolerance_failures
from simulator.ledger import StayTimeLedger, bootstrap_ci, format_pct, relative_diff
from simulator.response import ResponseModel
from simulator.sessions import Population, SessionBook, satisfaction
from simulator.world import World


@pytest.fixture(scope="module")
def model():
    return ResponseModel.load()


@pytest.fixture(scope="module")
def split():
    return kuairand.split_last_day(kuairand.read_log())


@pytest.fixture()
def world(model):
    return World(model, SimulatorConfig(), seed=0)


def test_split_holds_back_the_last_day(split):
    fit_log, held = split
    assert set(np.unique(held.date)) == {20220501}
    assert 20220501 not in set(np.unique(fit_log.date)) and len(fit_log) + len(held) == len(kuairand.read_log())


def test_artifact_is_small_and_fitted_without_the_last_day(model):
    assert 20220501 not in model.scalars["fit_days"]
    assert len(model.item_ids) >= 5000 and len(model.user_ids) > 20_000
    from simulator.response import default_world_path
    assert default_world_path().stat().st_size < 8e6


def test_response_model_within_tolerances_on_the_fit_rows(model, split):
    """Play-time quantiles per duration bucket and like/dislike rates: SimulatorConfig's tolerances."""
    fit_log, _ = split
    report = tolerance_report(model, fit_log, rows=len(fit_log), seed=0)
    assert report["buckets"], report
    assert tolerance_failures(report, SimulatorConfig()) == []


def test_world_beats_popularity_on_the_held_back_day(model, split):
    fit_log, held = split
    report = check_world(model, fit_log, held, seed=0)
    json.dumps(report)
    pop = report["popularity"]
    assert report["auc_long_view"] > pop["auc_long_view"] + 0.01, (report["auc_long_view"], pop["auc_long_view"])
    assert report["auc_like"] > pop["auc_like"] + 0.05, (report["auc_like"], pop["auc_like"])
    assert report["play_quantiles"] and pop["play_quantiles"]


def test_auc_is_the_rank_statistic():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == pytest.approx(0.5)


def test_check_command_prints_one_json_object(capsys):
    from onerec.cli import main
    assert main(["simulator", "check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"auc_long_view", "auc_like", "play_quantiles", "popularity"} <= set(out)
    assert {"auc_long_view", "auc_like", "play_quantiles"} <= set(out["popularity"])


# ---- responses, context, state ------------------------------------------------------------------
def test_respond_fields_history_and_context(world):
    user = int(world.users[3])
    items = [int(v) for v in world.item_ids[:5]]
    out = world.respond(user, items, now_s=10.0)
    assert len(out) == 5
    for r in out:
        assert set(r) == {"play_time_s", "like", "dislike", "follow", "comment", "forward", "collect"}
        assert isinstance(r["play_time_s"], float) and r["play_time_s"] >= 0
    ctx = world.context(user)
    assert set(ctx) == {"profile", "short", "long"}
    for part in ("short", "long"):
        assert len({len(v) for v in ctx[part].values()}) == 1
    assert ctx["short"]["item_id"][-5:] == items
    assert ctx["short"]["play_time_s"][-5:] == pytest.approx([r["play_time_s"] for r in out])
    assert all(0 <= f < 128 for f in ctx["short"]["flags"])
    liked = [bool(f & FLAG_BITS["like"]) for f in ctx["short"]["flags"][-5:]]
    assert liked == [r["like"] for r in out]


def test_expected_and_oracle_do_not_change_state(world):
    user = int(world.users[7])
    before = world.expected(user, world.item_ids[:50])
    world.oracle_top_k(user, 10)
    world.context(user)
    after = world.expected(user, world.item_ids[:50])
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert world.sessions.session(user) is None


def test_unknown_user_or_item_is_a_named_error(world):
    with pytest.raises(ValueError, match="user_id"):
        world.respond(-5, [int(world.item_ids[0])], 0.0)
    with pytest.raises(ValueError, match="item_id"):
        world.expected(int(world.users[0]), [-1])


def test_taste_drifts_only_toward_long_viewed_videos(model):
    w = World(model, SimulatorConfig(world_drift_rate=0.2), seed=1)
    user = int(w.users[11])
    st = w.state(user)
    before = st.vec.copy()
    long_item = int(w.item_ids[np.argmin(w.model.item_duration_s)])
    for _ in range(30):
        out = w.respond(user, [long_item], 0.0)
        if out[0]["play_time_s"] >= min(18.0, 0.9 * w.duration_of(long_item)):
            break
    assert not np.allclose(st.vec, before)
    row = w._rows_of_items([long_item])[0]
    q = w._item_unit[row]
    assert st.vec @ q / np.linalg.norm(st.vec) > before @ q / max(np.linalg.norm(before), 1e-12)


# ---- the oracle -----------------------------------------------------------------------------------
def test_oracle_top_k_is_the_argmax_of_expected_play_time(world):
    user = int(world.users[21])
    k = 8
    top = world.oracle_top_k(user, k)
    seen = {int(world.item_ids[r]) for r in world.state(user).recent}
    candidates = [int(v) for v in world.item_ids if int(v) not in seen]
    play = world.expected(user, candidates)["play_time_s"]
    best = [candidates[i] for i in np.argsort(-play, kind="stable")[:k]]
    assert top == best
    assert not set(top) & seen


# ---- sessions -------------------------------------------------------------------------------------
def _videos_until_exit(book: SessionBook, user: int, rows, play_share: float, repeat_first: bool) -> int:
    book.start(user, 0.0)
    seen, n = set(), 0
    for row in rows:
        d = 30.0
        book.observe(user, int(row), play_share * 18.0, d, dislike=False, repeat=row in seen)
        seen.add(row)
        n += 1
        if book.is_over(user):
            book.end(user)
            return n
    raise AssertionError("session never ended")


def test_repetition_ends_a_session_sooner_than_variety(model):
    cfg = SimulatorConfig()
    book = SessionBook(cfg, model.item_embedding, model.scalars["crowd_distance"])
    emb = model.item_embedding
    rng = np.random.default_rng(0)
    same = [5] * 200
    anchor = 5
    near = np.argsort(-(emb @ emb[anchor]))[:200]                  # near-identical distinct videos
    varied = []                                                    # each far from the others
    for r in rng.permutation(len(emb)):
        if all(emb[r] @ emb[v] < 1 - model.scalars["crowd_distance"] for v in varied[-cfg.world_crowd_window:]):
            varied.append(int(r))
        if len(varied) == 200:
            break
    n_same = _videos_until_exit(book, 1, same, 0.7, True)
    n_near = _videos_until_exit(book, 2, near, 0.7, False)
    n_varied = _videos_until_exit(book, 3, varied, 0.7, False)
    assert n_same < n_near < n_varied, (n_same, n_near, n_varied)


def test_unsatisfying_videos_end_a_session_sooner(model):
    book = SessionBook(SimulatorConfig(), model.item_embedding, model.scalars["crowd_distance"])
    rows = list(range(0, 4000, 20))
    assert _videos_until_exit(book, 1, rows, 0.1, False) < _videos_until_exit(book, 2, rows, 1.0, False)
    assert satisfaction(18.0, 300.0) == 1.0 and satisfaction(3.0, 6.0) == pytest.approx(3 / 5.4)


def test_satisfied_users_come_back_sooner(model):
    cfg = SimulatorConfig()
    gaps = {}
    for share in (0.1, 1.0):
        book = SessionBook(cfg, model.item_embedding, model.scalars["crowd_distance"])
        pop = Population(book, range(400), cfg, seed=0)
        returns = []
        for _ in range(400):
            t, user = pop.next_request()
            book.session(user).patience = 0.1                           # the page ends the session
            book.observe(user, user, share * 18.0, 30.0, dislike=False, repeat=False)
            assert pop.after_page(user, [{"play_time_s": share * 18.0}], t) is False
            returns.append(max(e[0] for e in pop._heap if e[2] == user) - t)
        gaps[share] = float(np.mean(returns))
    assert gaps[1.0] < 0.5 * gaps[0.1], gaps
    assert book.mean_gap_s(1.0) == pytest.approx(3600 * cfg.world_gap_min_h)


def test_population_time_moves_forward_and_sessions_continue(world):
    pop = world.population(world.users[:50], seed=0)
    last = -1.0
    for _ in range(300):
        t, user = pop.next_request()
        assert t >= last
        last = t
        out = world.respond(user, world.oracle_top_k(user, 4), t)
        pop.after_page(user, out, t)
    assert pop.sessions_started >= 50


# ---- arms, ledger, arena --------------------------------------------------------------------------
def test_ledger_report_math():
    ledger = StayTimeLedger(catalogue_size=10, cold_items=[9])
    for u in range(20):
        arm = "a" if u % 2 else "b"
        ledger.enroll(arm, u)
        play = 200.0 if arm == "a" else 100.0
        ledger.record(arm, u, 100.0, [{"play_time_s": play, "like": True}], [u % 10], new_session=True)
    rep = ledger.report(days=2.0, reference="b", n_boot=200)
    assert rep["arms"]["a"]["stay_time"] == pytest.approx(100.0)
    assert rep["arms"]["b"]["stay_time"] == pytest.approx(50.0)
    assert rep["arms"]["a"]["sessions_per_user_day"] == pytest.approx(0.5)
    assert rep["diff_vs_reference"]["a"]["diff"] == "+100.000%"
    assert rep["arms"]["a"]["cold_start_share"] == pytest.approx(0.2)
    assert format_pct(0.00227) == "+0.227%"
    lo, hi = bootstrap_ci(np.arange(100.0), n_boot=500)
    assert lo < 49.5 < hi
    d = relative_diff(np.full(50, 1.1), np.full(50, 1.0))
    assert d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(0.1)


def test_short_arena_run_tells_oracle_from_random(world):
    """The world can tell: the oracle's stay time is far above random's; popular is reported."""
    policies = fixed_policies(world, seed=0)
    rep = run_arena(world, policies, days=0.5, n_users=240, k=6, seed=0, reference="random", n_boot=300)
    arms = rep["arms"]
    assert arms["oracle"]["stay_time"] > 2.0 * arms["random"]["stay_time"], arms
    assert rep["diff_vs_reference"]["oracle"]["lo"] > 0.5
    assert arms["random"]["coverage"] > arms["popular"]["coverage"]
    assert arms["oracle"]["oracle_share"] == pytest.approx(1.0)
    print("arena:", {a: round(v["stay_time"], 1) for a, v in arms.items()})
