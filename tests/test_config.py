"""One config object: presets, TOML tables and command-line overrides, with errors that name the key."""
import pytest

from onerec.config import Config


def test_preset_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[stream]\nnamespace = "team-a"\n[loop]\nn_replicas = 3\n')
    cfg = Config.load(toml, overrides=["loop.n_replicas=4", "stream.bootstrap_servers=kafka:9092"])
    assert cfg.preset == "tiny"
    assert cfg.stream.namespace == "team-a"
    assert cfg.loop.n_replicas == 4          # the command line wins over the file
    assert cfg.stream.bootstrap_servers == "kafka:9092"


def test_paper_preset_changes_model():
    assert Config.from_name("1B").model != Config.from_name("tiny").model


@pytest.mark.parametrize("override, message", [
    ("nosuch.key=1", "unknown config section 'nosuch'"),
    ("loop.nosuch=1", "unknown config key 'loop.nosuch'"),
    ("loop.n_replicas=abc", "loop.n_replicas"),
    ("loop", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        Config.load(overrides=[override])


def test_bad_toml_table(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("stream = 3\n")
    with pytest.raises(ValueError, match="stream"):
        Config.load(toml)


def test_defaults_file_and_overrides_merge_before_one_construction(tmp_path, monkeypatch):
    """Each section is built once from the merged values: validation runs once, derived fields follow."""
    import onerec.config as config_module
    from actors.config import LoopConfig

    built = []

    class CountingLoopConfig(LoopConfig):
        def __post_init__(self):
            built.append(dict(vars(self)))
            super().__post_init__()

    monkeypatch.setitem(config_module.SECTIONS, "loop", CountingLoopConfig)
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nd_model = 128\n[loop]\nn_replicas = 3\ntop_k = 8\n")
    cfg = Config.load(toml, overrides=["loop.n_replicas=4", "loop.beam_width=16", "model.n_heads=8"])
    assert len(built) == 1, "the loop section must be constructed once, from the merged values"
    assert (cfg.loop.n_replicas, cfg.loop.top_k, cfg.loop.beam_width) == (4, 8, 16)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.d_head, cfg.model.g_kv) == (128, 8, 16, 8)
    assert cfg.model.d_ff == 4 * 128 and "_derived" not in vars(cfg.model)
    # a combination valid only once merged: checked per key, beam_width=2 would reject top_k=8 first
    cfg = Config.load(overrides=["loop.beam_width=2", "loop.top_k=2"])
    assert (cfg.loop.beam_width, cfg.loop.top_k) == (2, 2)


@pytest.mark.parametrize("override, message", [
    ("model.g_kv=3", "model.g_kv"), ("model.d_model=0", "model.d_model"), ("train.algorithm=ppo", "train.algorithm"),
    ("serve.bridge_port=70000", "serve.bridge_port"), ("serve.max_top_k=0", "serve.max_top_k"),
    ("serve.request_timeout_s=0", "serve.request_timeout_s"), ("loop.top_k=99", "loop.top_k"),
    ("loop.bridge_port=0", "moved: it is now 'serve.bridge_port'"),
    ("loop.api_token=x", "moved: it is now 'serve.api_token'"),
])
def test_invalid_values_name_section_and_key(override, message):
    with pytest.raises(ValueError, match=message):
        Config.load(overrides=[override])


def test_moved_key_in_a_file_names_the_new_key(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[loop]\nrequest_timeout_s = 3.0\n")
    with pytest.raises(ValueError, match="serve.request_timeout_s"):
        Config.load(toml)


def test_serve_section():
    from serving_bridge.config import ServeConfig

    cfg = Config.load(overrides=["serve.bridge_port=0", "serve.api_token=", "serve.max_context_items=10"])
    assert (cfg.serve.bridge_port, cfg.serve.api_token, cfg.serve.max_context_items) == (0, None, 10)
    assert Config.load(overrides=["serve.api_token=s3cret"]).serve.api_token == "s3cret"
    assert not hasattr(cfg.loop, "bridge_port")
    with pytest.raises(ValueError, match="serve.bridge_port"):
        ServeConfig(bridge_port=70000)
    serve = ServeConfig()
    serve.__post_init__()                # idempotent: validating twice changes nothing
    assert serve == ServeConfig()
