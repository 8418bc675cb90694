"""Benchmark: the join's own logic (streaming/join.py) on the KuaiRand week, in-process; prints one JSON object.

    python bench/join_logic.py                  # the whole week (~225k input events)
    python bench/join_logic.py --limit 20000    # a quick run (first N log rows)

No broker: the week's events (built by `simulator.replay.build_events`, encoded as on the topics, cached
in a temp file) go through `RequestJoiner` -> joined records -> `UserScorer` with dict stores, the way the
worker drives them: every `--batch` input events stage 1 runs `close_due()` and `drain()`, its joined
records go to stage 2 (partitioned by user id like Kafka's default partitioner) followed by watermark
heartbeats to every stage-2 partition, then stage 2 runs `release()` and `drain()`.
A wall clock that stands still means windows close on event time only; at the end it jumps past
`idle_close` so every window closes.

Reported: `logic_events_per_s` = input events / wall seconds of both stages, `cpu_s` (process CPU of
the same), `per_event_us` per stage (stage 1: per input event; stage 2: per joined record), and the
same-run baseline `decode_only_events_per_s` (orjson.loads of every input event, nothing else, timed batch
by batch just before the logic sees the batch, so that both see the same load of a shared machine).
Target: logic_events_per_s >= 40,000 on the full week.
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
from streaming.join import WATERMARK_KEY, RequestJoiner, UserScorer, watermark_heartbeat  # noqa: E402
from simulator.replay import build_events  # noqa: E402

KINDS = ("impressions", "feedback", "ticks")
CACHE_VERSION = 1


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
        index, key = (0 if kind == "impression" else 1), event["request_id"].encode()
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
    """Both stages over the events, as the worker drives them; wall/CPU seconds per stage and counts."""
    clock = StandingClock(1.0e9)
    joiner = RequestJoiner(cfg, {t: {} for t in RequestJoiner.tables}, wall_clock=clock)
    scorer = UserScorer(cfg, {t: {} for t in UserScorer.tables}, wall_clock=clock)
    parts = cfg.partitions
    partition_of = [kafka_partition(key, parts) for _, key, _ in events]
    wall = {"stage1": 0.0, "stage2": 0.0, "decode_only": 0.0}
    cpu = {"stage1": 0.0, "stage2": 0.0}
    counts = {"joined": 0, "samples": 0, "dead_letters": 0, "writes": 0}
    digest = hashlib.sha256()
    sent_marks: dict[int, float] = {}

    user_partition: dict[bytes, int] = {}   # the worker memoizes the partitioner too

    def stage2(batch1) -> None:
        joined = []
        for out in batch1.outputs:
            if out.kind == "joined":
                if out.key not in user_partition:
                    user_partition[out.key] = kafka_partition(out.key, parts)
                joined.append((user_partition[out.key], out.key, out.value))
            else:
                counts["dead_letters"] += 1
        counts["joined"] += len(joined)
        w0, c0 = time.perf_counter(), time.process_time()
        for partition, key, value in joined:
            scorer.on_joined(partition, key, value)
        for src, mark in batch1.closed_through.items():
            if mark > sent_marks.get(src, float("-inf")):
                sent_marks[src] = mark
                beat = watermark_heartbeat(src, mark)
                for p in range(parts):
                    scorer.on_joined(p, WATERMARK_KEY, beat)
        scorer.release()
        batch2 = scorer.drain()
        wall["stage2"] += time.perf_counter() - w0
        cpu["stage2"] += time.process_time() - c0
        counts["writes"] += len(batch2.writes)
        for out in batch2.outputs:
            if out.kind == "samples":
                counts["samples"] += 1
                digest.update(out.key)
            else:
                counts["dead_letters"] += 1

    def stage1(chunk, partitions) -> None:
        d0 = time.perf_counter()   # the baseline, interleaved so that both see the same machine load
        for _, _, raw in chunk:
            orjson.loads(raw)
        wall["decode_only"] += time.perf_counter() - d0
        w0, c0 = time.perf_counter(), time.process_time()
        for (kind, key, raw), p in zip(chunk, partitions):
            joiner.on_message(KINDS[kind], p, key, raw)
        joiner.close_due()
        batch1 = joiner.drain()
        wall["stage1"] += time.perf_counter() - w0
        cpu["stage1"] += time.process_time() - c0
        counts["writes"] += len(batch1.writes)
        stage2(batch1)

    for start in range(0, len(events), batch):
        stage1(events[start:start + batch], partition_of[start:start + batch])
    clock.t += cfg.idle_close + 1.0            # the end of the stream: every input idle, every window closes
    stage1([(2, b"tick", b"0")] * parts, list(range(parts)))
    return {"wall": wall, "cpu": cpu, "counts": counts,
            "stats": {"join": vars(joiner.stats), "score": vars(scorer.stats)},
            "samples_key_digest": digest.hexdigest()[:16]}


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
    runs = sorted((run_logic(cfg, events, args.batch) for _ in range(args.repeat)),
                  key=lambda r: r["wall"]["stage1"] + r["wall"]["stage2"])
    run = runs[len(runs) // 2]
    decode_s = run["wall"]["decode_only"]
    wall_s = run["wall"]["stage1"] + run["wall"]["stage2"]
    cpu_s = run["cpu"]["stage1"] + run["cpu"]["stage2"]
    joined = max(run["counts"]["joined"], 1)
    n_imp = sum(1 for kind, _, _ in events if kind == 0)
    print(json.dumps({
        "events": n, "impressions": n_imp, "feedback": n - n_imp,
        "input_mb": round(sum(len(raw) for _, _, raw in events) / 1e6, 1),
        "logic_events_per_s": round(n / wall_s, 1),
        "wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3),
        "per_event_us": {"stage1_per_input_event": round(1e6 * run["wall"]["stage1"] / n, 2),
                         "stage2_per_joined_record": round(1e6 * run["wall"]["stage2"] / joined, 2),
                         "stage2_per_input_event": round(1e6 * run["wall"]["stage2"] / n, 2)},
        "cpu_s_per_stage": {k: round(v, 3) for k, v in run["cpu"].items()},
        "decode_only_events_per_s": round(n / decode_s, 1),
        "logic_vs_decode_only": round((n / wall_s) / (n / decode_s), 3),
        "counts": run["counts"], "samples_key_digest": run["samples_key_digest"],
        "join_stats": run["stats"], "target_logic_events_per_s": 40_000, "batch": args.batch,
        "partitions": args.partitions, "load_s": round(load_s, 2), "repeat": args.repeat, "gc_freeze": args.gc_freeze,
    }))


if __name__ == "__main__":
    main()
