"""`onerec replay PATH`: publish a KuaiRand log as impressions and feedback, in time order.

Invariant: events leave in event-time order and every feedback after its own impression: rows are
grouped into requests (`simulator.kuairand.group_requests`: one user's rows within `gap_s`; a
repeated video starts a new request, as a request shows an item once), each
request is one `legacy` impression at its first row's time (logprob null; semantic ids from a
tokenizer if given, else null), and each row is one feedback at the row's time (+1 ms, so it sorts
after an impression of the same instant). The user context of an impression is the user's
behaviour before it (`UserHistory`, warm-started from the pre-week history), as a server would
have logged it. With `speedup` S > 0, event time runs S times faster than the wall clock; 0 means
as fast as the broker takes it.

    onerec replay data/kuairand-pure/log_standard_2022-04-25_to_05-01.csv.gz --limit 5000
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from simulator import kuairand
from streaming import schemas
from streaming.client import EventPublisher
from streaming.config import StreamConfig
from streaming.topics import ensure_topics

FEEDBACK_DELAY_S = 0.001   # a row's feedback sorts just after the impression of the same instant


@dataclass
class ReplaySummary:
    rows: int
    requests: int
    impressions: int
    feedback: int
    users: int
    event_time_span_s: float
    wall_s: float
    events_per_s: float


def split_repeats(log: kuairand.ImpressionLog, requests: list[np.ndarray]) -> list[np.ndarray]:
    """A request shows an item once (the schema's rule): a repeated video starts a new request."""
    out = []
    for rows in requests:
        start, seen = 0, set()
        for j, item in enumerate(log.video_id[rows].tolist()):
            if item in seen:
                out.append(rows[start:j])
                start, seen = j, set()
            seen.add(item)
        out.append(rows[start:])
    out.sort(key=lambda rows: int(rows[0]))
    return out


def build_events(log: kuairand.ImpressionLog, *, gap_s: float = 60.0, max_items: int = 10,
                 short_len: int = 20, long_len: int = 100, tokenizer=None, request_prefix: str = "kr",
                 ts_offset_s: float = 0.0):
    """Yield ("impression" | "feedback", event) in event-time order (a generator: contexts are built lazily)."""
    requests = split_repeats(log, kuairand.group_requests(log, gap_s=gap_s, max_items=max_items))
    history = kuairand.UserHistory(short_len=short_len, long_len=long_len, warm_start=True)
    # merge: impression of request r at its first row's time; feedback of row i at its time + delay
    imp_times = np.asarray([log.time_ms[rows[0]] for rows in requests], dtype=np.float64) / 1000.0 + ts_offset_s
    fb_times = log.time_ms.astype(np.float64) / 1000.0 + FEEDBACK_DELAY_S + ts_offset_s
    request_of_row = np.empty(len(log), dtype=np.int64)
    for r, rows in enumerate(requests):
        request_of_row[rows] = r
    kinds = np.concatenate([np.zeros(len(requests), np.int8), np.ones(len(log), np.int8)])
    index = np.concatenate([np.arange(len(requests)), np.arange(len(log))])
    times = np.concatenate([imp_times, fb_times])
    order = np.lexsort((kinds, times))   # by time, impressions first on ties
    for n in order.tolist():
        kind, i, ts = int(kinds[n]), int(index[n]), float(times[n])
        if kind == 0:
            rows = requests[i]
            user = int(log.user_id[rows[0]])
            item_ids = log.video_id[rows].tolist()
            sids = tokenizer.codes_for(np.asarray(item_ids)).tolist() if tokenizer is not None else [None] * len(rows)
            yield "impression", {
                "request_id": f"{request_prefix}-{user}-{int(log.time_ms[rows[0]])}-{i}", "user_id": user, "ts": ts,
                "model_version": 0, "source": "legacy", "context": history.context(user),
                "items": [{"item_id": int(v), "semantic_id": s, "duration_s": float(log.duration_ms[row]) / 1000.0,
                           "logprob": None} for v, s, row in zip(item_ids, sids, rows.tolist())],
            }
        else:
            r = int(request_of_row[i])
            rows = requests[r]
            user = int(log.user_id[i])
            play_s = float(log.play_time_ms[i]) / 1000.0
            fb = {"request_id": f"{request_prefix}-{user}-{int(log.time_ms[rows[0]])}-{r}", "user_id": user,
                  "item_id": int(log.video_id[i]), "ts": ts, "play_time_s": play_s,
                  "dislike": bool(log.is_hate[i]), "like": bool(log.is_like[i]), "follow": bool(log.is_follow[i]),
                  "comment": bool(log.is_comment[i]), "forward": bool(log.is_forward[i])}
            history.record(user, int(log.video_id[i]), float(log.duration_ms[i]) / 1000.0, play_s,
                           kuairand.flags_of(log, i))
            yield "feedback", fb


def replay(cfg: StreamConfig, path: str | Path | None = None, *, speedup: float = 0.0, limit: int | None = None,
           tokenizer=None, gap_s: float = 60.0, max_items: int = 10, short_len: int = 20, long_len: int = 100,
           progress: bool = True, publisher: EventPublisher | None = None,
           on_event=None, request_prefix: str = "kr", ts_offset_s: float = 0.0) -> ReplaySummary:
    """Publish the log; `on_event(kind, event, wall_time)` is called after each send (the benchmark uses it)."""
    if speedup < 0 or not math.isfinite(speedup):
        raise ValueError(f"speedup must be >= 0 and finite, got {speedup!r}")
    log = kuairand.read_log(path, limit=limit)
    if len(log) == 0:
        raise ValueError(f"{path}: no rows to replay")
    own_publisher = publisher is None
    publisher = publisher or EventPublisher(cfg)
    counts = {"impression": 0, "feedback": 0}
    first_ts = float(log.time_ms[0]) / 1000.0 + ts_offset_s
    total = len(log) + len(split_repeats(log, kuairand.group_requests(log, gap_s=gap_s, max_items=max_items)))
    start = time.monotonic()
    try:
        with tqdm(total=total, unit="ev", desc="replay", disable=not progress, mininterval=1.0) as bar:
            for kind, event in build_events(log, gap_s=gap_s, max_items=max_items, short_len=short_len,
                                            long_len=long_len, tokenizer=tokenizer,
                                            request_prefix=request_prefix, ts_offset_s=ts_offset_s):
                if speedup > 0:
                    ahead = (event["ts"] - first_ts) / speedup - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                (publisher.impression if kind == "impression" else publisher.feedback)(event)
                if on_event is not None:
                    on_event(kind, event, time.time())
                counts[kind] += 1
                bar.update(1)
            publisher.flush()
    finally:
        if own_publisher:
            publisher.close()
    wall = time.monotonic() - start
    n = counts["impression"] + counts["feedback"]
    return ReplaySummary(rows=len(log), requests=counts["impression"], impressions=counts["impression"],
                         feedback=counts["feedback"], users=int(np.unique(log.user_id).size),
                         event_time_span_s=float(log.time_ms[-1] - log.time_ms[0]) / 1000.0,
                         wall_s=round(wall, 3), events_per_s=round(n / wall, 1) if wall > 0 else float("inf"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="KuaiRand standard log (.csv or .csv.gz); default: the shipped week")
    parser.add_argument("--speedup", type=float, default=0.0, help="event time / wall time; 0 = as fast as possible")
    parser.add_argument("--limit", type=int, help="replay only the first N rows")
    parser.add_argument("--tokenizer", help="a saved learner SemanticTokenizer: fills in semantic ids")
    parser.add_argument("--gap-s", type=float, default=60.0, help="rows of a user closer than this form one request")
    parser.add_argument("--max-items", type=int, default=10, help="items per request at most")
    parser.add_argument("--short-len", type=int, default=20)
    parser.add_argument("--long-len", type=int, default=100)
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace, cfg) -> int:
    tokenizer = None
    if args.tokenizer:
        from learner.tokenizer import SemanticTokenizer

        tokenizer = SemanticTokenizer.load(args.tokenizer)
    try:
        ensure_topics(cfg.stream)
        summary = replay(cfg.stream, args.path, speedup=args.speedup, limit=args.limit, tokenizer=tokenizer,
                         gap_s=args.gap_s, max_items=args.max_items, short_len=args.short_len,
                         long_len=args.long_len, progress=not args.no_progress)
    except (ValueError, OSError, schemas.SchemaError) as exc:
        print(f"onerec replay: {exc}", file=sys.stderr)
        return 1
    for key, value in asdict(summary).items():
        print(f"{key:>18}: {value}")
    return 0
