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
