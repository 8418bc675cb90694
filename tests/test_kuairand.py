"""The shipped KuaiRand slice and its featurization into user contexts and item embeddings."""
import numpy as np
import pytest

from simulator import kuairand


def test_log_is_sorted_and_complete():
    log = kuairand.read_log()
    assert len(log) == 115_574
    assert np.all(np.diff(log.time_ms) >= 0)
    assert set(np.unique(log.is_hate)) <= {0, 1}


def test_read_log_names_bad_row(tmp_path):
    bad = tmp_path / "log.csv"
    header = "user_id,video_id,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,long_view,play_time_ms,duration_ms,tab"
    bad.write_text(header + "\n1,2,3,1,0,0,0,0,0,0,100,200,1\n1,x,4,1,0,0,0,0,0,0,100,200,1\n")
    with pytest.raises(ValueError, match="row 3"):
        kuairand.read_log(bad)


def test_profile_features_in_range():
    p = kuairand.profile_features(0)
    assert len(p) == kuairand.PROFILE_FIELDS
    assert all(0 < x < kuairand.PROFILE_VOCAB for x in p)
    assert kuairand.profile_features(10**9) == [0] * kuairand.PROFILE_FIELDS


def test_user_history_windows_and_order():
    h = kuairand.UserHistory(short_len=3, long_len=2, warm_start=False)
    for i in range(10):
        h.record(7, item_id=100 + i, duration_s=10.0, play_time_s=float(i), flags=i % 2)
    ctx = h.context(7)
    assert ctx["short"]["item_id"] == [107, 108, 109]  # newest last
    assert ctx["long"]["item_id"] == [105, 106]
    assert ctx["short"]["play_time_s"] == [7.0, 8.0, 9.0]
    assert len(ctx["profile"]) == kuairand.PROFILE_FIELDS


def test_warm_start_uses_pre_week_history():
    uid = next(iter(kuairand.read_user_history()))
    ctx = kuairand.UserHistory(short_len=5, long_len=50).context(uid)
    watched = kuairand.read_user_history()[uid]["watch_seq"]
    got = ctx["long"]["item_id"] + ctx["short"]["item_id"]
    assert got == watched[-len(got):]


def test_group_requests_partitions_rows_by_user_and_gap():
    log = kuairand.read_log(limit=5000)
    groups = kuairand.group_requests(log, gap_s=60.0, max_items=4)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(log)))
    for g in groups:
        assert len(g) <= 4
        assert len(set(log.user_id[g].tolist())) == 1
        assert np.all(np.diff(log.time_ms[g]) <= 60_000)


def test_item_embeddings_put_co_watched_items_close():
    ids, emb = kuairand.item_embeddings()
    assert emb.shape[0] == len(ids) == 7583 and np.isfinite(emb).all()
    # items co-watched by many users are nearer than random pairs, on average
    log = kuairand.read_log()
    index = {int(i): n for n, i in enumerate(ids.tolist())}
    order = np.lexsort((log.time_ms, log.user_id))
    u, v = log.user_id[order], log.video_id[order]
    same = u[:-1] == u[1:]
    a = np.asarray([index[x] for x in v[:-1][same][:2000]])
    b = np.asarray([index[x] for x in v[1:][same][:2000]])
    cos = lambda x, y: np.sum(emb[x] * emb[y], 1) / (np.linalg.norm(emb[x], axis=1) * np.linalg.norm(emb[y], axis=1))
    rng = np.random.default_rng(0)
    r1, r2 = rng.integers(0, len(ids), 2000), rng.integers(0, len(ids), 2000)
    assert cos(a, b).mean() > cos(r1, r2).mean() + 0.1
