"""Integration: `onerec replay` of a KuaiRand slice through the broker and the worker.

Every row of the slice becomes one shown item of a legacy impression and one feedback; every shown
item yields one sample, and every feedback is either in its sample or a dead letter with a reason.
"""
import orjson
import pytest

from simulator import kuairand
from streaming import schemas
from streaming.client import WorkerProcess, read_events
from simulator.replay import build_events, replay
from streaming.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_events_are_time_ordered_and_feedback_follows_its_impression():
    log = kuairand.read_log(limit=500)
    shown_at = {}
    last_ts = float("-inf")
    n_fb = 0
    for kind, event in build_events(log):
        assert event["ts"] >= last_ts
        last_ts = event["ts"]
        if kind == "impression":
            schemas.validate_impression(event)
            assert event["source"] == "legacy" and all(it["logprob"] is None for it in event["items"])
            shown_at[event["request_id"]] = {it["item_id"] for it in event["items"]}
        else:
            schemas.validate_feedback(event)
            assert event["item_id"] in shown_at[event["request_id"]], "feedback after its impression"
            n_fb += 1
    assert n_fb == len(log)


def test_replayed_slice_yields_a_sample_per_row(stream_config, tmp_path):
    cfg = stream_config
    cfg.feedback_window_s = 120.0
    ensure_topics(cfg)
    summary = replay(cfg, None, limit=400, progress=False)
    assert summary.rows == summary.feedback == 400 and summary.impressions <= 400
    with WorkerProcess(cfg, log_path=tmp_path / "worker.log") as worker:
        records = read_events(cfg, "samples", until=lambda rs: len(rs) >= 400 or not worker.alive(), timeout_s=90)
        assert worker.alive(), worker.log_text()
        letters = read_events(cfg, "dead-letters", timeout_s=3, idle_s=1.5)
    samples = [schemas.decode_sample(r.value) for r in records]
    assert len({schemas.sample_id(s) for s in samples}) == 400, worker.log_text()
    with_feedback = [s for s in samples if s["feedback"] is not None]
    reasons = [orjson.loads(r.value)["reason"] for r in letters]
    assert all("late feedback" in r for r in reasons), reasons
    assert len(with_feedback) + len(reasons) == 400         # every feedback accounted for
    assert len(with_feedback) >= 390
    assert all(0.0 <= s["q"] <= 1.0 for s in with_feedback)
    assert all(s["semantic_id"] is None and s["source"] == "legacy" for s in samples)
