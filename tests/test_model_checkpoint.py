"""Checkpoints: safetensors round trips (bytes, fsspec paths), model + tokenizer in one file."""
import numpy as np
import pytest
import torch

from learner.checkpoint import (load_model, load_state, save_model, save_state, state_dict_from_bytes,
                                state_dict_to_bytes)
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=4, max_long=4, item_hash_buckets=256,
                                           n_layers=3, n_experts=3, moe_top_k=2, moe_d_ff=16, first_dense_layers=1)


def test_state_dict_bytes_round_trip():
    torch.manual_seed(0)
    model = LazyDecoder(CFG)
    data = state_dict_to_bytes(model.state_dict())
    assert isinstance(data, bytes)
    back = state_dict_from_bytes(data)
    sd = model.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert "blocks.1.ffn.expert_bias" in back       # the balancing bias travels with the weights


def test_shared_storage_and_bad_bytes():
    t = torch.arange(6.0)
    back = state_dict_from_bytes(state_dict_to_bytes({"a": t, "b": t}))
    assert torch.equal(back["a"], back["b"])
    with pytest.raises(ValueError, match="weights"):
        state_dict_from_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="weights"):
        state_dict_from_bytes("text")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_load_state_through_fsspec(tmp_path, where):
    path = str(tmp_path / "sub" / "ckpt.safetensors") if where == "local" else "memory://ckpts/x.safetensors"
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7)}
    save_state(path, tensors, {"version": 3, "note": "hello"})
    back, manifest = load_state(path)
    assert manifest == {"version": 3, "note": "hello"}
    assert torch.equal(back["w"], tensors["w"]) and int(back["step"]) == 7


def test_model_and_tokenizer_round_trip(tmp_path):
    torch.manual_seed(0)
    item_ids, _, tok = random_catalogue(40, codebook_size=8, seed=5)
    model = LazyDecoder(CFG).eval()
    path = str(tmp_path / "model.safetensors")
    save_model(path, model, tok, {"step": 5})
    model2, tok2, manifest = load_model(path)
    assert manifest["step"] == 5 and manifest["model_config"]["n_experts"] == 3
    assert model2.cfg == CFG
    np.testing.assert_array_equal(tok2.codes_for(item_ids), tok.codes_for(item_ids))
    ctx = build_context_batch([random_context(np.random.default_rng(0), CFG, item_ids)], tok, CFG)
    targets = torch.from_numpy(tok.codes_for(item_ids[:1]))
    with torch.no_grad():
        torch.testing.assert_close(model2(ctx, targets), model(ctx, targets), rtol=0, atol=0)
