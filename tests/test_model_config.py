"""Presets: Table 5 parameter counts by counting (no big model is built), derivation, validation."""
import pytest

from learner.config import PRESETS, TABLE5_PARAMS, ModelConfig, TrainConfig


@pytest.mark.parametrize("name", sorted(TABLE5_PARAMS))
def test_preset_parameter_counts_within_ten_percent_of_table5(name):
    cfg = ModelConfig.from_name(name)
    assert abs(cfg.n_params() / TABLE5_PARAMS[name] - 1) < 0.10, cfg.n_params()


def test_moe_preset_active_parameters():
    cfg = ModelConfig.from_name("4B-A0.5B")
    assert abs(cfg.n_params(active=True) / 0.5e9 - 1) < 0.10
    assert (cfg.n_experts, cfg.n_shared_experts, cfg.moe_top_k, cfg.moe_d_ff) == (53, 1, 3, 1408)
    assert [cfg.is_moe_layer(layer) for layer in range(4)] == [False, False, True, True]


def test_table5_shapes():
    cfg = ModelConfig.from_name("1B")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.embed_dim, cfg.d_head, cfg.g_kv) == (1792, 18, 14, 90, 128, 14)
    assert cfg.d_context == cfg.d_model and cfg.codebook_size == 8192


def test_derived_fields_follow_their_sources():
    cfg = ModelConfig.from_name("tiny")
    assert cfg.d_head == 16 and cfg.g_kv == 4
    cfg = cfg.replace(n_heads=8)
    cfg.__post_init__()            # idempotent: validating again changes nothing
    assert cfg.d_head == 8 and cfg.g_kv == 8
    cfg = cfg.replace(g_kv=2)      # an explicit value is kept
    cfg = cfg.replace(d_model=128)
    assert cfg.g_kv == 2 and cfg.d_head == 16
    assert cfg.replace(n_heads=4).d_head == 32
    assert ModelConfig.from_name("tiny", d_model=128, n_heads=8).d_head == 16   # overrides, then one construction
    assert "_derived" not in vars(cfg)


@pytest.mark.parametrize("changes,field", [
    ({"g_kv": 3}, "g_kv"), ({"s_kv": 3}, "s_kv"), ({"n_levels": 4}, "n_levels"), ({"l_kv": 5}, "l_kv"),
    ({"n_experts": 4, "moe_top_k": 5, "moe_d_ff": 8}, "moe_top_k"), ({"d_model": 0}, "d_model"),
])
def test_invalid_model_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_name("tiny").replace(**changes)


def test_unknown_preset_and_train_config():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.from_name("3B")
    assert set(PRESETS) >= {"tiny", "0.1B", "8B", "4B-A0.5B"}
    assert TrainConfig().algorithm == "gbpo"
    with pytest.raises(ValueError, match="algorithm"):
        TrainConfig(algorithm="ppo")
    assert TrainConfig(device="cpu").resolve_device() == "cpu"
