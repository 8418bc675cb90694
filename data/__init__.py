"""`onerec_data`: the files the commands read at run time (KuaiRand-Pure, the fitted simulator), as package data.

Invariant: every shipped file is reached through `data_path(*parts)` (importlib.resources), never
through a path relative to a checkout, so a PYTHONPATH checkout, the editable install and the
installed wheel resolve the same names. In the repository this folder is `data/`; `onerec_data` is a
link to it, and pyproject.toml's package-data glob ships everything under it (see the READMEs for
the licences: KuaiRand is CC BY-SA 4.0).

    data_path("kuairand-pure", "user_features_pure.csv.gz")
    data_path("topics.toml", package="infra")          # package data of another of our packages
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_path(*parts: str, package: str = __name__) -> Path:
    """Filesystem path of `parts` inside `package`'s installed folder (it may not exist yet: a writer's target)."""
    resource = files(package).joinpath(*parts)
    if not isinstance(resource, Path):   # a zip import: our packages are always installed as folders
        raise RuntimeError(f"{package} is not installed as a folder ({resource!r}); install the wheel unzipped")
    return resource
