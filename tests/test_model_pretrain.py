"""`onerec pretrain` on a slice of the KuaiRand log: every row accounted for, a loadable checkpoint."""
import argparse
import collections

import numpy as np
import torch

from offline import pretrain
from simulator import kuairand
from onerec.config import Config
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)


def test_training_pairs_use_only_the_history_before_each_request():
    log = kuairand.read_log(limit=3000)
    from learner.tokenizer import SemanticTokenizer

    catalogue = kuairand.read_video_features()["video_id"]
    codes = torch.from_numpy(np.stack(np.unravel_index(np.arange(len(catalogue)), (64, 64, 64)), 1))
    tok = SemanticTokenizer.from_tensors({                  # ids without k-means: only lookups matter here
        **{f"centroids_{i}": torch.zeros(64, 2) for i in range(3)}, "item_ids": torch.from_numpy(catalogue),
        "codes": codes, "codebook_sizes": torch.tensor([64, 64, 64])})
    stats = collections.Counter()
    pairs = list(pretrain.training_pairs(log, tok, short_len=5, long_len=20, stats=stats))
    assert stats["rows"] == len(log) and stats["skipped_item_not_in_catalogue"] == 0
    assert stats["pairs"] + stats["skipped_not_watched"] == len(log) and len(pairs) == stats["pairs"] > 0
    seen: dict[int, list[int]] = collections.defaultdict(list)
    at = 0
    for rows in kuairand.group_requests(log):
        user = int(log.user_id[rows[0]])
        watched = [int(log.video_id[i]) for i in rows if log.play_time_ms[i] > 0]
        group = pairs[at:at + len(watched)]
        assert [item for _, item, _ in group] == watched and all(u == user for _, _, u in group)
        for context, _, _ in group:
            assert context is group[0][0]                   # one context per request
            recent = seen[user][-5:]                        # what the user watched in earlier requests
            assert context["short"]["item_id"][len(context["short"]["item_id"]) - len(recent):] == recent
        seen[user].extend(watched)
        at += len(watched)
    assert at == len(pairs)


def test_pretrain_command_writes_a_checkpoint_and_prints_recommendations(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    args = parser.parse_args(["--time-budget", "3", "--out", str(tmp_path / "pt"), "--log-limit", "3000",
                              "--show-users", "2", "--shuffle-buffer", "256"])
    cfg = Config.load(overrides=["train.batch_size=32"])
    assert pretrain.main(args, cfg) == 0
    out = capsys.readouterr().out
    assert out.count("top-5") == 2 and "checkpoint:" in out
    from learner.checkpoint import CheckpointStore
    from learner.model import LazyDecoder
    from learner.tokenizer import SemanticTokenizer

    manifest, files = CheckpointStore(str(tmp_path / "pt")).latest()
    assert manifest["kind"] == "pretrain" and manifest["step"] >= 1
    stats = manifest["stats"]
    assert stats["pairs"] + stats["skipped_not_watched"] + stats["skipped_item_not_in_catalogue"] == stats["rows"]
    model = LazyDecoder(cfg.model)
    model.load_state_dict(files["model"])
    tok = SemanticTokenizer.from_tensors(files["tokenizer"])
    assert len(tok) > 0
    assert np.isfinite(manifest["loss_ema"])
