"""Benchmark: the join's own logic (streaming/join.py) on the KuaiRand week, in-process; prints one JSON object.

    python bench/join_logic.py                  # the whole week (~225k input events)
    python bench/join_logic.py --limit 20000    # a quick run (first N log rows)

No broker: the week's events (built by `simulator.replay.build_events`, encoded and keyed by user id as
on the topics, cached in a temp file) go through the one-stage `UserJoin` with dict stores, the way the
worker drives it: every `--batch` input events it runs `close_due()` and `drain()`. A wall clock that
stands still means windows close on event time only; at the end it jumps past `idle_close` so every
window closes.

Reported: `logic_events_per_s` = input events / wall seconds of the join, `cpu_s` (process CPU of the
same), `per_event_us`, and the same-run baseline `decode_only_events_per_s` (orjson.loads of every input
event, nothing else, timed batch by batch just before the logic sees the batch, so that both see the
same load of a shared machine). Target: logic_events_per_s >= 40,000 on the full week (`target_met`).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
from aiokafka.partitioner import murmur2  # noqa: E402

from simulator import kuairand  # noqa: E402
from streaming import schemas  # noqa: E402
from streaming.config import StreamConfig  # noqa: E402
from streaming.join import TABLES, UserJoin, user_key  # noqa: E402
from simulator.replay import build_events  # noqa: E402

KINDS = ("impressions", "feedback", "ticks")
CACHE_VERSION = 2   # 2: keyed by user id (topic layout 2)


def kafka_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), as the producers and streaming/app.py use it."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def cached_events(limit: int | None) -> list[tuple[int, bytes, bytes]]:
    """[(kind index, key, encoded event)] in replay order; built once, then read from a temp file."""
    log_file = kuairand.data_dir() / kuairand.LOG_FILE
    tag = hashlib.sha1(f"{CACHE_VERSION}:{log_file.stat().st_mtime_ns}:{limit}".encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"onerec-join-logic-{tag}.bin"
    if path.exists():
        data, events, at = path.read_bytes(), [], 0
        while at < len(data):
            kind, klen, vlen = struct.unpack_from("<BII", data, at)
            at += 9
            events.append((kind, data[at:at + klen], data[at + klen:at + klen + vlen]))
            at += klen + vlen
        return events
    events, chunks = [], []
    for kind, event in build_events(kuairand.read_log(None, limit=limit)):
        raw = schemas.encode_impression(event) if kind == "impression" else schemas.encode_feedback(event)
        index, key = (0 if kind == "impression" else 1), user_key(event["user_id"])
        events.append((index, key, raw))
        chunks.append(struct.pack("<BII", index, len(key), len(raw)) + key + raw)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return events


class StandingClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run_logic(cfg: StreamConfig, events: list[tuple[int, bytes, bytes]], batch: int) -> dict:
    """The join over the events, as the worker drives it; wall/CPU seconds and counts."""
    clock = StandingClock(1.0e9)
    join = UserJoin(cfg, {t: {} for t in TABLES}, wall_clock=clock)
    parts = cfg.partitions
    partition_of = [kafka_partition(key, parts) for _, key, _ in events]
    wall = {"join": 0.0, "decode_only": 0.0}
    cpu = {"join": 0.0}
    counts = {"samples": 0, "dead_letters": 0, "writes": 0}
    digest = hashlib.sha256()

    def one_batch(chunk, partitions) -> None:
        d0 = time.perf_counter()   # the baseline, interleaved so that both see the same machine load
        for _, _, raw in chunk:
            orjson.loads(raw)
        wall["decode_only"] += time.perf_counter() - d0
        w0, c0 = time.perf_counter(), time.process_time()
        for (kind, key, raw), p in zip(chunk, partitions):
            join.on_message(KINDS[kind], p, key, raw)
        join.close_due()
        drained = join.drain()
        wall["join"] += time.perf_counter() - w0
        cpu["join"] += time.process_time() - c0
        counts["writes"] += len(drained.writes)
        for out in drained.outputs:
            if out.kind == "samples":
                counts["samples"] += 1
                digest.update(out.value[:64])
            else:
                counts["dead_letters"] += 1

    for start in range(0, len(events), batch):
        one_batch(events[start:start + batch], partition_of[start:start + batch])
    clock.t += cfg.idle_close + 1.0            # the end of the stream: every input idle, every window closes
    one_batch([(2, b"tick", b"0")] * parts, list(range(parts)))
    return {"wall": wall, "cpu": cpu, "counts": counts, "stats": {"join": vars(join.stats)},
            "samples_digest": digest.hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="first N rows of the week's log")
    parser.add_argument("--batch", type=int, default=2000,
                        help="input events per close_due()/drain() (the worker's batch_max)")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs of the logic; the median wall is reported")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() the heap before the run, as a worker could after start-up: the cyclic "
                             "garbage collector then no longer walks the interpreter's and libraries' objects")
    args = parser.parse_args()

    cfg = StreamConfig(partitions=args.partitions)
    t0 = time.perf_counter()
    events = cached_events(args.limit)
    load_s = time.perf_counter() - t0
    n = len(events)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    runs = sorted((run_logic(cfg, events, args.batch) for _ in range(args.repeat)), key=lambda r: r["wall"]["join"])
    run = runs[len(runs) // 2]
    decode_s, wall_s, cpu_s = run["wall"]["decode_only"], run["wall"]["join"], run["cpu"]["join"]
    n_imp = sum(1 for kind, _, _ in events if kind == 0)
    target = 40_000
    print(json.dumps({
        "events": n, "impressions": n_imp, "feedback": n - n_imp,
        "input_mb": round(sum(len(raw) for _, _, raw in events) / 1e6, 1),
        "logic_events_per_s": round(n / wall_s, 1),
        "wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3),
        "per_event_us": round(1e6 * wall_s / n, 2),
        "decode_only_events_per_s": round(n / decode_s, 1),
        "logic_vs_decode_only": round((n / wall_s) / (n / decode_s), 3),
        "counts": run["counts"], "samples_digest": run["samples_digest"],
        "join_stats": run["stats"], "target_logic_events_per_s": target, "target_met": n / wall_s >= target,
        "batch": args.batch, "partitions": args.partitions, "load_s": round(load_s, 2), "repeat": args.repeat,
        "gc_freeze": args.gc_freeze,
    }))


if __name__ == "__main__":
    main()
