"""The one checkpoint store: safetensors groups + a manifest written last, through fsspec."""
import numpy as np
import pytest
import torch

from learner.checkpoint import CheckpointStore, load_optimizer, optimizer_tensors, tensors_from_bytes
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.synthetic import random_catalogue, random_context
from learner.tokenizer import SemanticTokenizer
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=4, max_long=4, item_hash_buckets=256,
                                           n_layers=3, n_experts=3, moe_top_k=2, moe_d_ff=16, first_dense_layers=1)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_model_tokenizer_and_optimizer_round_trip(tmp_path, where):
    torch.manual_seed(0)
    item_ids, _, tok = random_catalogue(40, codebook_size=8, seed=5)
    model = LazyDecoder(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = build_context_batch([random_context(np.random.default_rng(0), CFG, item_ids)], tok, CFG)
    targets = torch.from_numpy(tok.codes_for(item_ids[:1]))
    model.loss(ctx, targets).backward()
    opt.step()
    url = str(tmp_path / "ckpt") if where == "local" else f"memory://ckpt-{tmp_path.name}"
    store = CheckpointStore(url, keep=2)
    opt_t, groups = optimizer_tensors(opt)
    store.save(5, {"model": model.state_dict(), "tokenizer": tok.to_tensors(), "optimizer": opt_t},
               {"step": 5, "param_groups": groups})
    manifest, files = store.latest()
    assert manifest["step"] == 5 and manifest["path"].endswith("step-00000005")
    assert "blocks.1.ffn.expert_bias" in files["model"]         # the balancing bias travels with the weights
    model2 = LazyDecoder(CFG)
    model2.load_state_dict(files["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    load_optimizer(opt2, files["optimizer"], manifest["param_groups"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    tok2 = SemanticTokenizer.from_tensors(files["tokenizer"])
    np.testing.assert_array_equal(tok2.codes_for(item_ids), tok.codes_for(item_ids))
    model.eval(), model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(ctx, targets), model(ctx, targets), rtol=0, atol=0)


def test_manifest_last_prune_and_shared_storage(tmp_path):
    store = CheckpointStore(str(tmp_path / "c"), keep=2)
    t = torch.arange(6.0)
    for step in (1, 2, 3):
        store.save(step, {"w": {"a": t * step, "b": (t * step)}}, {"step": step})
    store.save(4, {"w": {"a": t, "b": t}}, {"step": 4})          # entries sharing storage are cloned, not refused
    assert [p.rsplit("/", 1)[-1] for p in store._folders()] == ["step-00000003", "step-00000004"]
    (tmp_path / "c" / "step-00000009").mkdir()                     # a folder without a manifest: not a checkpoint
    (tmp_path / "c" / "step-00000009" / "w.safetensors").write_bytes(b"half written")
    manifest, files = store.latest()
    assert manifest["step"] == 4 and torch.equal(files["w"]["a"], files["w"]["b"])


def test_corrupt_files_are_named():
    with pytest.raises(ValueError, match="weights"):
        tensors_from_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="weights"):
        tensors_from_bytes("text")
    with pytest.raises(ValueError, match="must not be empty"):
        CheckpointStore("")
