"""What a user installs: the command line loads only what a command needs, and the wheel alone runs the commands.

The wheel test builds the package from a copy of this checkout, installs it into a fresh folder and runs
`onerec` from outside the checkout with only that folder on the path, so the data it reads (KuaiRand, the
fitted simulator, the topic settings) must have come inside the wheel.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray")

# Runs `onerec ARGV` in a fresh interpreter, then prints which heavy top-level modules got imported.
PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from onerec.cli import build_parser, command_of
    from onerec.config import Config
    argv = sys.argv[1:]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        args = build_parser(command_of(argv)).parse_args(argv)
        Config.load(None, overrides=args.set, preset=args.preset)   # what main() does before running
    loaded = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "ray"})
    print(json.dumps({"heavy": loaded, "help": out.getvalue()}))
""")


def probe(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("argv, own_option", [
    (["--help"], "broker"), (["broker", "--help"], "--topics"), (["topics", "--help"], "--delete"),
    (["broker", "--port", "9092"], None), (["topics", "--set", "stream.partitions=2"], None),
])
def test_light_commands_load_neither_torch_nor_ray(argv, own_option):
    result = probe(*argv)
    assert result["heavy"] == [], f"onerec {' '.join(argv)} imported {result['heavy']}"
    if own_option:
        assert own_option in result["help"], "a command's own arguments must appear in its --help"


def test_probe_sees_a_command_that_needs_torch():
    """The check above is not vacuous: a command whose module imports torch shows up with it."""
    result = probe("eval", "--help")
    assert "torch" in result["heavy"]
    assert "sequences" in result["help"] and "replay" in result["help"]


@pytest.mark.slow
def test_wheel_alone_runs_the_commands(tmp_path):
    source = tmp_path / "source"    # build from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".venv"))
    wheels, target, outside = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    outside.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(source), "-w", str(wheels)],
                   check=True, timeout=300, cwd=str(outside))
    (wheel,) = wheels.glob("onerec_stream-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--root-user-action=ignore", "--target", str(target), str(wheel)],
                   check=True, timeout=300, cwd=str(outside))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ONEREC_DATA_DIR")}
    env["PYTHONPATH"] = str(target)

    def onerec(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "onerec.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=str(outside), timeout=300)

    where = subprocess.run([sys.executable, "-c", "import json, onerec.cli, onerec_data, simulator.users, "
                            "streaming.topics; print(json.dumps([onerec.cli.__file__, onerec_data.__file__, "
                            "str(simulator.users.default_params_path()), str(streaming.topics.TOPIC_SETTINGS)]))"],
                           capture_output=True, text=True, env=env, cwd=str(outside), timeout=120)
    assert where.returncode == 0, where.stderr
    for path in json.loads(where.stdout):
        assert Path(path).resolve().is_relative_to(target.resolve()), f"{path} is not from the installed wheel"

    check = onerec("simulator", "--check-only")
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert "within tolerances" in check.stdout
    topics = onerec("topics", "--help")
    assert topics.returncode == 0 and "--delete" in topics.stdout, topics.stderr
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
