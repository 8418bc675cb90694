"""The one place that reads the KuaiRand-Pure week shipped in `data/kuairand-pure/`.

Invariant: nothing outside the package data is read (`onerec_data.data_path`, so the installed wheel
reads its own copy); `ONEREC_DATA_DIR` may point at another folder with the same file names (for
example a full KuaiRand download).
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

from learner import history
from learner.catalogue import ItemCatalogue
from learner.flags import FLAG_BITS
from onerec_data import data_path

LOG_FILE = "log_standard_2022-04-25_to_05-01.csv.gz"
USER_FEATURES_FILE = "user_features_pure.csv.gz"
VIDEO_FEATURES_FILE = "video_features_basic_pure.csv.gz"
USER_HISTORY_FILE = "user_history_2022-04-09_to_04-24.jsonl.gz"


def data_dir() -> Path:
    """Folder holding the KuaiRand-Pure files (the package data's `kuairand-pure/` unless overridden)."""
    env = os.environ.get("ONEREC_DATA_DIR")
    path = Path(env) if env else data_path("kuairand-pure")
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
    date: np.ndarray         # int64 (N,) yyyymmdd, the log's own `date` column (UTC+8 calendar day if absent)

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def slice(self, start: int, stop: int) -> "ImpressionLog":
        return ImpressionLog(**{k: getattr(self, k)[start:stop] for k in self.__dataclass_fields__})

    def take(self, index: np.ndarray) -> "ImpressionLog":
        return ImpressionLog(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})


_INT_COLUMNS = [f for f in ImpressionLog.__dataclass_fields__ if f != "date"]


def read_log(path: str | Path | None = None, limit: int | None = None) -> ImpressionLog:
    """Read a KuaiRand standard log (csv or csv.gz) into column arrays, sorted by time_ms.

    Rows with a missing or malformed value in a used column raise ValueError naming the row.
    The shipped week (no path, no limit) is read once per process and shared: don't mutate it.
    """
    if path is None and limit is None:
        return _shipped_log()
    return _read_log(Path(path) if path is not None else data_dir() / LOG_FILE, limit)


@lru_cache(maxsize=1)
def _shipped_log() -> ImpressionLog:
    return _read_log(data_dir() / LOG_FILE, None)


def _read_log(path: Path, limit: int | None) -> ImpressionLog:
    opener = gzip.open if str(path).endswith(".gz") else open
    cols: dict[str, list[int]] = {c: [] for c in _INT_COLUMNS}
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _INT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        has_date = "date" in (reader.fieldnames or [])
        dates: list[int] = []
        for n, row in enumerate(reader):
            if limit is not None and n >= limit:
                break
            try:
                for c in _INT_COLUMNS:
                    cols[c].append(int(float(row[c])))
                if has_date:
                    dates.append(int(row["date"]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: row {n + 2}: bad value ({exc})") from None
    arrays = {c: np.asarray(v, dtype=np.int64) for c, v in cols.items()}
    arrays["date"] = np.asarray(dates, dtype=np.int64) if has_date else _utc8_dates(arrays["time_ms"])
    order = np.argsort(arrays["time_ms"], kind="stable")
    return ImpressionLog(**{c: a[order] for c, a in arrays.items()})


def _utc8_dates(time_ms: np.ndarray) -> np.ndarray:
    """yyyymmdd of each epoch-ms time in UTC+8 (Beijing), KuaiRand's calendar."""
    days = (np.asarray(time_ms, dtype=np.int64) // 1000 + 8 * 3600) // 86400
    dt = days.astype("datetime64[D]").astype(str)
    return np.asarray([int(d.replace("-", "")) for d in dt], dtype=np.int64)


def split_last_day(log: ImpressionLog) -> tuple[ImpressionLog, ImpressionLog]:
    """(rows of every day but the last, rows of the last day) by the log's `date`; time order kept.

    The world is fitted on the first part and checked on the second (data it was not fitted on).
    """
    days = np.unique(log.date)
    if len(days) < 2:
        raise ValueError(f"log spans {len(days)} day(s); need >= 2 to hold the last one back")
    last = log.date == days[-1]
    return log.take(np.flatnonzero(~last)), log.take(np.flatnonzero(last))


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


# --------------------------------------------------------------------------- user features
# Categorical user features become small ints, one per field, 0 meaning "unknown".
_PROFILE_COLUMNS = (
    ["user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
     "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range"]
    + [f"onehot_feat{i}" for i in range(18)]
)
PROFILE_FIELDS = len(_PROFILE_COLUMNS)  # 26
PROFILE_VOCAB = 64                      # per field; high-cardinality fields fold their ranks modulo 63


@lru_cache(maxsize=1)
def _profile_table() -> dict[int, list[int]]:
    feats = read_user_features()
    columns = []
    for c in _PROFILE_COLUMNS:
        values = feats[c].astype(str)
        ranks = {v: i for i, v in enumerate(sorted(set(values.tolist())))}
        columns.append([1 + ranks[v] % (PROFILE_VOCAB - 1) for v in values.tolist()])
    return {int(uid): [col[n] for col in columns] for n, uid in enumerate(feats["user_id"].tolist())}


def profile_features(user_id: int) -> list[int]:
    """The user's `PROFILE_FIELDS` categorical profile ids, each in [0, PROFILE_VOCAB); zeros if unknown."""
    return list(_profile_table().get(int(user_id), [0] * PROFILE_FIELDS))


# --------------------------------------------------------------------------- flags and durations
FLAG_LIKE, FLAG_FOLLOW, FLAG_COMMENT, FLAG_FORWARD, FLAG_COLLECT, FLAG_DISLIKE, FLAG_LONG_VIEW = (
    FLAG_BITS[n] for n in ("like", "follow", "comment", "forward", "collect", "dislike", "long_view"))


def flags_of(log: ImpressionLog, i: int) -> int:
    """The interface's action bitmask for row i of the log (KuaiRand has no 'collect')."""
    return (FLAG_LIKE * int(log.is_like[i]) | FLAG_FOLLOW * int(log.is_follow[i])
            | FLAG_COMMENT * int(log.is_comment[i]) | FLAG_FORWARD * int(log.is_forward[i])
            | FLAG_DISLIKE * int(log.is_hate[i]) | FLAG_LONG_VIEW * int(log.long_view[i]))


@lru_cache(maxsize=1)
def video_durations_s() -> dict[int, float]:
    """Video duration in seconds from the video features (NaN durations become 0.0)."""
    v = read_video_features()
    d = np.nan_to_num(v["video_duration"] / 1000.0, nan=0.0)
    return {int(i): float(x) for i, x in zip(v["video_id"].tolist(), d.tolist())}


# --------------------------------------------------------------------------- user histories
def warm_start_rows(user_id: int) -> list[tuple[int, float, float, int]]:
    """A user's pre-week KuaiRand history as history rows. It has no play times: a long-watched item is
    imputed as watched to the end, any other as a quarter of its duration."""
    hist = read_user_history().get(int(user_id))
    if hist is None:
        return []
    durations = video_durations_s()
    long_watch, liked = set(hist["long_watch_seq"]), set(hist["like_seq"])
    rows = []
    for item in hist["watch_seq"]:
        d = durations.get(int(item), 0.0)
        lw = item in long_watch
        flags = (FLAG_LONG_VIEW if lw else 0) | (FLAG_LIKE if item in liked else 0)
        rows.append((int(item), d, d if lw else 0.25 * d, flags))
    return rows


class UserHistory(history.UserHistory):
    """`learner.history.UserHistory` with KuaiRand's profile features and (with `warm_start`) the users'
    pre-week histories: the embedded world's source of user views."""

    def __init__(self, short_len: int = 20, long_len: int = 256, warm_start: bool = True):
        super().__init__(short_len=short_len, long_len=long_len, profile_fields=PROFILE_FIELDS,
                         profile_of=profile_features, warm_start=warm_start_rows if warm_start else None)


def fit_profile(model_cfg):
    """The model config with KuaiRand's profile shape (contexts built here carry PROFILE_FIELDS fields)."""
    if (model_cfg.profile_fields, model_cfg.profile_vocab) == (PROFILE_FIELDS, PROFILE_VOCAB):
        return model_cfg
    return model_cfg.replace(profile_fields=PROFILE_FIELDS, profile_vocab=PROFILE_VOCAB)


def item_catalogue(dim: int = 32) -> ItemCatalogue:
    """Every KuaiRand video with its duration and the embedding its semantic id is fitted on."""
    item_ids, emb = item_embeddings(dim=dim)
    durations = video_durations_s()
    return ItemCatalogue(item_ids=np.asarray(item_ids, dtype=np.int64),
                         durations_s=np.array([durations.get(int(i), 0.0) for i in item_ids], dtype=np.float64),
                         embeddings=emb)


# --------------------------------------------------------------------------- requests
def group_requests(log: ImpressionLog, gap_s: float = 60.0, max_items: int = 10) -> list[np.ndarray]:
    """Row indices grouped into requests: one user's rows, each within gap_s of the previous, at most
    max_items per request. Requests are ordered by their first row's time; rows keep time order."""
    if gap_s <= 0 or max_items < 1:
        raise ValueError(f"gap_s must be > 0 and max_items >= 1, got {gap_s}, {max_items}")
    open_req: dict[int, list[int]] = {}
    last_t: dict[int, int] = {}
    done: list[list[int]] = []
    gap_ms = gap_s * 1000.0
    for i, (u, t) in enumerate(zip(log.user_id.tolist(), log.time_ms.tolist())):
        cur = open_req.get(u)
        if cur is not None and (t - last_t[u] > gap_ms or len(cur) >= max_items):
            done.append(cur)
            cur = None
        if cur is None:
            cur = open_req[u] = []
        cur.append(i)
        last_t[u] = t
    done.extend(open_req.values())
    done.sort(key=lambda rows: rows[0])
    return [np.asarray(r, dtype=np.int64) for r in done]


# --------------------------------------------------------------------------- item embeddings
@lru_cache(maxsize=2)
def _default_item_embeddings(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return _item_embeddings(read_log(), dim)


def item_embeddings(log: ImpressionLog | None = None, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """See `_item_embeddings`; the default log's result is cached (arrays are shared: don't mutate)."""
    if log is None:
        return _default_item_embeddings(dim)
    return _item_embeddings(log, dim)


def _item_embeddings(log: ImpressionLog, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One vector per video in the catalogue, for the semantic-id tokenizer.

    Why this mix: semantic ids should put items that the same users watch close together
    (collaborative signal, as OneRec's item embeddings do) while still placing items nobody has
    watched yet (content signal). So each item is [co-occurrence part (dim) | content part]:
    - co-occurrence: items watched by the same user within 10 positions (pre-week histories and the
      week's log), as a positive PMI matrix, reduced by truncated SVD to `dim` dims, rows L2-normed;
    - content: log duration, video and upload type one-hots, and the first tag hashed into 16 slots,
      scaled to weigh a third of the whole.
    Returns (item_ids (N,), embeddings (N, dim + content) float32), N = catalogue size.
    """
    v = read_video_features()
    item_ids = v["video_id"]
    index = {int(i): n for n, i in enumerate(item_ids.tolist())}
    n = len(item_ids)

    # sequences: pre-week histories + this week's log per user
    seqs: list[list[int]] = [h["watch_seq"] for h in read_user_history().values()]
    order = np.lexsort((log.time_ms, log.user_id))
    users, vids = log.user_id[order], log.video_id[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    seqs.extend(s.tolist() for s in np.split(vids, bounds))

    window = 10
    flat = [index[x] for s in seqs for x in s if x in index]
    seq_id = np.repeat(np.arange(len(seqs)), [sum(1 for x in s if x in index) for s in seqs])
    flat = np.asarray(flat, dtype=np.int64)
    keys = []
    for k in range(1, window + 1):  # pairs k apart within the same sequence, both directions
        a, b = flat[:-k], flat[k:]
        keep = (seq_id[:-k] == seq_id[k:]) & (a != b)
        keys += [a[keep] * n + b[keep], b[keep] * n + a[keep]]
    co = np.bincount(np.concatenate(keys), minlength=n * n).astype(np.float32).reshape(n, n)
    total = co.sum()
    marg = co.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * total / np.outer(marg, marg))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0).astype(np.float32)
    rng = np.random.default_rng(0)
    # randomized truncated SVD (a few power iterations) keeps this to ~a second for 7.5k items
    q = rng.standard_normal((n, dim + 8)).astype(np.float32)
    for _ in range(3):
        q, _r = np.linalg.qr(ppmi @ (ppmi.T @ q))
    u_small, s, _vt = np.linalg.svd(q.T @ ppmi, full_matrices=False)
    collab = (q @ u_small[:, :dim]) * np.sqrt(s[:dim])
    collab /= np.linalg.norm(collab, axis=1, keepdims=True) + 1e-8

    dur = np.nan_to_num(v["video_duration"] / 1000.0, nan=0.0)
    content = [np.log1p(dur)[:, None] / 5.0]
    for col in ("video_type", "upload_type"):
        cats = sorted(set(v[col].tolist()))
        content.append(np.eye(len(cats), dtype=np.float32)[[cats.index(x) for x in v[col].tolist()]])
    tag_slots = np.zeros((n, 16), dtype=np.float32)
    for r, tag in enumerate(v["tag"].tolist()):
        first = str(tag).split(",")[0]
        if first not in ("", "nan"):
            tag_slots[r, int(first) % 16 if first.isdigit() else hash(first) % 16] = 1.0
    content.append(tag_slots)
    content_m = np.concatenate(content, axis=1).astype(np.float32)
    content_m /= np.linalg.norm(content_m, axis=1, keepdims=True) + 1e-8
    emb = np.concatenate([collab, 0.5 * content_m], axis=1).astype(np.float32)
    return item_ids.astype(np.int64), emb
