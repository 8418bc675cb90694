"""The one place that reads the KuaiRand-Pure week shipped in `data/kuairand-pure/`.

Invariant: nothing outside the repository is read; `ONEREC_DATA_DIR` may point at
another folder with the same file names (for example a full KuaiRand download).
The files are CC BY-SA 4.0 (Gao et al., CIKM 2022); see data/kuairand-pure/README.md.
"""
from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson

LOG_FILE = "log_standard_2022-04-25_to_05-01.csv.gz"
USER_FEATURES_FILE = "user_features_pure.csv.gz"
VIDEO_FEATURES_FILE = "video_features_basic_pure.csv.gz"
USER_HISTORY_FILE = "user_history_2022-04-09_to_04-24.jsonl.gz"


def data_dir() -> Path:
    """Folder holding the KuaiRand-Pure files (repo's `data/kuairand-pure/` unless overridden)."""
    env = os.environ.get("ONEREC_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "kuairand-pure"
    if not (path / LOG_FILE).exists():
        raise FileNotFoundError(f"KuaiRand log not found: {path / LOG_FILE} (set ONEREC_DATA_DIR)")
    return path


@dataclass(frozen=True)
class ImpressionLog:
    """Column arrays of the standard log, sorted by time. Times in ms, durations in ms."""

    user_id: np.ndarray      # int64 (N,)
    video_id: np.ndarray     # int64 (N,)
    time_ms: np.ndarray      # int64 (N,)
    play_time_ms: np.ndarray  # int64 (N,)
    duration_ms: np.ndarray  # int64 (N,)
    is_click: np.ndarray     # int8 (N,)
    is_like: np.ndarray
    is_follow: np.ndarray
    is_comment: np.ndarray
    is_forward: np.ndarray
    is_hate: np.ndarray
    long_view: np.ndarray
    tab: np.ndarray

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def slice(self, start: int, stop: int) -> "ImpressionLog":
        return ImpressionLog(**{k: getattr(self, k)[start:stop] for k in self.__dataclass_fields__})

    def take(self, index: np.ndarray) -> "ImpressionLog":
        return ImpressionLog(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})


_INT_COLUMNS = [f for f in ImpressionLog.__dataclass_fields__]


def read_log(path: str | Path | None = None, limit: int | None = None) -> ImpressionLog:
    """Read a KuaiRand standard log (csv or csv.gz) into column arrays, sorted by time_ms.

    Rows with a missing or malformed value in a used column raise ValueError naming the row.
    """
    path = Path(path) if path is not None else data_dir() / LOG_FILE
    opener = gzip.open if str(path).endswith(".gz") else open
    cols: dict[str, list[int]] = {c: [] for c in _INT_COLUMNS}
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _INT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        for n, row in enumerate(reader):
            if limit is not None and n >= limit:
                break
            try:
                for c in _INT_COLUMNS:
                    cols[c].append(int(float(row[c])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: row {n + 2}: bad value ({exc})") from None
    arrays = {c: np.asarray(v, dtype=np.int64) for c, v in cols.items()}
    order = np.argsort(arrays["time_ms"], kind="stable")
    return ImpressionLog(**{c: a[order] for c, a in arrays.items()})


@lru_cache(maxsize=1)
def read_video_features() -> dict[str, np.ndarray]:
    """Basic video features as column arrays indexed by row; `video_id` gives the id.

    Numeric columns are float64 (NaN where empty); `video_type`, `upload_type` and `tag` stay strings.
    """
    with gzip.open(data_dir() / VIDEO_FEATURES_FILE, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, np.ndarray] = {}
    for c in rows[0].keys():
        vals = [r[c] for r in rows]
        if c in ("video_type", "upload_type", "tag", "upload_dt"):
            out[c] = np.asarray(vals, dtype=object)
        else:
            out[c] = np.asarray([float(v) if v not in ("", None) else np.nan for v in vals])
    out["video_id"] = out["video_id"].astype(np.int64)
    return out


@lru_cache(maxsize=1)
def read_user_features() -> dict[str, np.ndarray]:
    """Official user features as column arrays (strings for range/categorical columns)."""
    with gzip.open(data_dir() / USER_FEATURES_FILE, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, np.ndarray] = {}
    for c in rows[0].keys():
        vals = [r[c] for r in rows]
        try:
            out[c] = np.asarray([float(v) if v != "" else np.nan for v in vals])
        except ValueError:
            out[c] = np.asarray(vals, dtype=object)
    out["user_id"] = out["user_id"].astype(np.int64)
    return out


@lru_cache(maxsize=1)
def read_user_history() -> dict[int, dict[str, list[int]]]:
    """Per user, the warm-start history before the week: watch_seq, like_seq, long_watch_seq."""
    out: dict[int, dict[str, list[int]]] = {}
    with gzip.open(data_dir() / USER_HISTORY_FILE, "rb") as f:
        for line in f:
            rec = orjson.loads(line)
            out[int(rec["user_id"])] = {
                "watch_seq": rec.get("watch_seq", []),
                "like_seq": rec.get("like_seq", []),
                "long_watch_seq": rec.get("long_watch_seq", []),
                "last_time_ms": rec.get("last_time_ms"),
            }
    return out
