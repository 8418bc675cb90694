"""`onerec eval`: the leave-one-out split, the item embeddings, and the whole `sequences` run on a
synthetic file with a learnable pattern (the model must beat most-popular)."""
import json

import numpy as np
import pytest

from offline import sequences, trainers
from onerec import cli


def test_read_sequences_and_leave_one_out(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12 13\n2 20 21\n\n3 30 31 32\n1 14\n")
    seqs = sequences.read_sequences(path)
    assert seqs == {1: [10, 11, 12, 13, 14], 2: [20, 21], 3: [30, 31, 32]}
    split = sequences.leave_one_out(seqs)
    assert split.users.tolist() == [1, 3]             # user 2 has too few items
    assert split.train == [[10, 11, 12], [30]]
    assert split.valid_target.tolist() == [13, 31]
    assert split.test_target.tolist() == [14, 32]
    assert split.test_history(0) == [10, 11, 12, 13]
    assert split.train_items().tolist() == [10, 11, 12, 30]


def test_bad_sequence_file_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("1 2 3\n2 x 4\n")
    with pytest.raises(ValueError, match="line 2"):
        sequences.read_sequences(path)


def test_cooccurrence_embeddings_put_co_watched_items_together():
    # items 0-4 always appear together, 5-9 together, never mixed
    rng = np.random.default_rng(0)
    train = [list(rng.permutation(5)) for _ in range(50)] + [list(5 + rng.permutation(5)) for _ in range(50)]
    emb = sequences.cooccurrence_embeddings(train, np.arange(10), dim=4)
    sim = emb @ emb.T
    within = (sim[:5, :5].sum() - 5) / 20
    across = sim[:5, 5:].mean()
    assert within > across + 0.5


def test_sequence_context_keeps_the_newest_items():
    from learner.config import ModelConfig

    cfg = ModelConfig.from_name("tiny")
    ctx = sequences.sequence_context(list(range(1, 131)), cfg)
    assert ctx["short"]["item_id"] == list(range(111, 131))
    assert ctx["long"]["item_id"] == list(range(11, 111))
    assert ctx["profile"] == [0] * cfg.profile_fields
    assert set(ctx["short"]["flags"]) == {0}


def test_popular_baseline_ranks_by_training_counts():
    ranked = trainers.recommend_popular([[1, 2], [2, 3, 3, 3]], 2, top_k=2)
    assert ranked.tolist() == [[3, 2], [3, 2]]


def test_eval_sequences_finds_the_pattern_and_beats_most_popular(tmp_path, capsys):
    path = tmp_path / "synthetic.txt"
    sequences.write_sequences(sequences.synthetic_sequences(200, 20, seed=0), path)
    rc = cli.main(["eval", "sequences", str(path), "--time-budget", "300", "--max-steps", "100",
                   "--batch-size", "64", "--beam-width", "20", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"model", "popular", "sasrec"}
    for name in result:
        assert set(result[name]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert all(0.0 <= v <= 1.0 for v in result[name].values())
    assert result["model"]["recall@10"] > result["popular"]["recall@10"] + 0.15
    assert result["model"]["ndcg@10"] > result["popular"]["ndcg@10"] + 0.15
    assert result["sasrec"]["recall@10"] > result["popular"]["recall@10"]


def _write_log(path, rows):
    import csv

    columns = ["user_id", "video_id", "time_ms", "play_time_ms", "duration_ms", "is_click", "is_like",
               "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "tab"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, 0) for c in columns})


def test_eval_replay_scores_before_training_and_learns_the_hot_items(tmp_path, capsys):
    """Every request's positive is one of three hot videos: most-popular-so-far only knows them after
    the first block (prequential), and the model learns them from the positives it trains on."""
    from simulator import kuairand

    catalogue = kuairand.read_video_features()["video_id"]
    hot = [int(v) for v in catalogue[-3:]]  # not where a zero-count ranking starts
    rng = np.random.default_rng(0)
    rows, t = [], 1_650_000_000_000
    for n in range(320):
        user = int(rng.integers(0, 5000))
        t += 120_000  # two minutes apart: one request per row
        rows.append({"user_id": user, "video_id": hot[n % 3], "time_ms": t, "play_time_ms": 30_000,
                     "duration_ms": 20_000, "long_view": 1, "is_click": 1})
        rows.append({"user_id": user + 5000, "video_id": int(rng.choice(catalogue[:-3])), "time_ms": t + 1,
                     "play_time_ms": 1_000, "duration_ms": 60_000})
    path = tmp_path / "log.csv"
    _write_log(path, rows)
    out = tmp_path / "replay"
    rc = cli.main(["eval", "replay", str(path), "--out", str(out), "--train-every", "16", "--lr", "3e-3",
                   "--beam-width", "10", "--json"])
    assert rc == 0
    final = json.loads(capsys.readouterr().out)
    result = json.loads((out / "replay.json").read_text())
    assert (out / "replay.png").stat().st_size > 10_000
    assert final["popular"]["scored_requests"] == 320
    # the first block is scored before anything was trained or counted: popular misses it
    assert 0.9 < final["popular"]["recall@10"] < 1.0
    curve = result["curve"]
    assert curve[0]["popular_recall@10"] < curve[-1]["popular_recall@10"]
    assert final["model"]["recall@10"] > 0.3
    assert curve[-1]["model_recall@10"] > curve[0]["model_recall@10"]
    assert final["model"]["mean_q"] is not None and 0.0 <= final["model"]["mean_q"] <= 1.0
