"""Weight push: time to push 10M- and 100M-parameter models to 2 replicas vs a plain memcpy.

Prints ONE JSON object. For each size: `push_s` (median over repeats of publish -> both replicas
serve the new version: pack to safetensors with its XXH3-64 checksum, `ray.put`, the ref to the
replicas, their checksum check and the swap to a model viewing the object-store buffer),
`memcpy_s` (median copy of the same number of bytes into fresh memory, in the same run), and
whether push <= 3 x memcpy + 50 ms. Per stage (medians): `pack_s` (copy + checksum in the
learner), `put_s` (`ray.put`), `apply_s` (the slower replica's verify + build + swap).

Steady state is timed, as in a learner that publishes for hours: the first pushes
(`warmup_push_s`, reported) write object-store memory no process has touched yet, which
page-faults at ~1 GB/s. The publisher keeps `keep_versions` versions alive, so from the
(keep_versions + 2)-th push on a 400 MB version reuses touched memory (the default warm-up).
Smaller versions keep landing on untouched memory for ~20 pushes, so the 10M number is
conservative (~10 ms of its `put_s`).

    python bench/weights.py            # both sizes
    python bench/weights.py --sizes 10 # only 10M
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import ray
import torch

from actors.publisher import WeightPublisher, pack_weights
from actors.replica import WeightsOnlyReplicaActor

WIDTH = 1000  # each layer is WIDTH x WIDTH + WIDTH parameters (~1M)
KEEP_VERSIONS = 4  # the publisher's default: versions alive in the object store


def make_model(n_million: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(n_million)])


def bench_size(n_million: int, repeats: int, warmups: int) -> dict:
    model = make_model(n_million)
    n_params = sum(p.numel() for p in model.parameters())
    replicas = [WeightsOnlyReplicaActor.options(num_cpus=0.5).remote(lambda n=n_million: make_model(n))
                for _ in range(2)]
    ray.get([r.version.remote() for r in replicas], timeout=300)
    publisher = WeightPublisher(replicas, keep_versions=KEEP_VERSIONS)
    push_times, warmup_times, stages = [], [], []
    for i in range(repeats + warmups):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        start = time.perf_counter()
        weights = publisher.publish(model.state_dict())
        versions = publisher.wait_applied(timeout_s=300)
        elapsed = time.perf_counter() - start
        if publisher.errors() or set(versions.values()) != {weights.version}:
            raise RuntimeError(f"push failed: {publisher.errors()} {versions}")
        applies = [h["last_apply_s"] for h in ray.get([r.health.remote() for r in replicas], timeout=60)]
        if i >= warmups:
            push_times.append(elapsed)
            stages.append({"pack_s": weights.pack_s, "put_s": weights.put_s, "apply_s": max(applies)})
        else:
            warmup_times.append(elapsed)
    n_bytes = publisher.latest.n_bytes
    source = pack_weights(model.state_dict())
    memcpy_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy = np.empty_like(source)
        np.copyto(copy, source)
        memcpy_times.append(time.perf_counter() - start)
        del copy
    for r in replicas:
        ray.kill(r)
    push_s = statistics.median(push_times)
    memcpy_s = statistics.median(memcpy_times)
    return {"params": n_params, "bytes": n_bytes, "push_s": round(push_s, 4), "memcpy_s": round(memcpy_s, 4),
            "push_all_s": [round(t, 4) for t in push_times],
            "warmup_push_s": [round(t, 4) for t in warmup_times],
            **{name: round(statistics.median(s[name] for s in stages), 4) for name in ("pack_s", "put_s", "apply_s")},
            "target_s": round(3 * memcpy_s + 0.05, 4), "meets_target": push_s <= 3 * memcpy_s + 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="model sizes in millions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=KEEP_VERSIONS + 2,
                        help="pushes before timing (cold object-store memory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             object_store_memory=2 * 1024**3,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        result = {"replicas": 2, "cpu_count": os.cpu_count(),
                  "cuda": torch.cuda.is_available()}
        for size in args.sizes:
            result[f"{size}M"] = bench_size(size, args.repeats, args.warmups)
    finally:
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
