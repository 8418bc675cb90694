"""Test hygiene: the test session leaves the working directory's `runs/` (a user's own runs) as it found it.

Every test writes under its own `tmp_path`; a test that falls back to a default path under `runs/`
(the drift log, checkpoints, logs) fails the session here, naming the files it wrote.
"""
from pathlib import Path

import pytest


def _snapshot(root: Path) -> dict[str, float]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def runs_folder_untouched():
    root = Path.cwd() / "runs"
    before = _snapshot(root)
    yield
    after = _snapshot(root)
    written = sorted(name for name, mtime in after.items() if before.get(name) != mtime)
    assert not written, f"tests wrote into {root}: {written[:10]}"
