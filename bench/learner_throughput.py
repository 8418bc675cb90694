"""Throughput of one learner worker, its MFU, and data-parallel scaling on CPU (issue 14, item 5).

(Issue 14 calls it bench/learner.py; a file of that name in bench/ would shadow the `learner` package
for every script in bench/, which run with bench/ first on sys.path.)

Prints ONE JSON object, every figure from this run:
- `matmul_gflops`: a large fp32 matmul (2048^3) at the step's thread count, measured just before and
  after each batch size (the larger counts): the peak the step is held to.
- `tiny.<n>_thread.batches`: one worker at 1 and at 2 threads, for batch 32, 256, 1024 (tiny preset, realistic contexts of 20 short + 100 long items
  and 26 profile fields, as the loop's users have): the context batch built from sample dicts
  (`featurize_ms`), `learner.step.train_step` (one forward giving L_Gen and log pi, GBPO, backward,
  clip, AdamW: `step_ms`), samples/s of the step and of featurize + step, and
  `step_mfu` = FLOPs per training sample (learner.flops: 3 x forward, counted) x samples/s / matmul peak.
- `scaling`: the global batch (256) trained by 1 worker with 1 thread, 1 worker with 2 threads, and
  2 workers with 1 thread each (torch.distributed gloo, DistributedDataParallel: gradients
  all-reduced during backward, 128 rows each), in turn, twice (the best round of each counts);
  efficiency = samples/s of 2 workers / (2 x 1 worker 1 thread).

Targets: step_mfu >= 0.30 at batch 256; scaling efficiency >= 0.8. The machine is shared: figures
are medians of timed steps after a warm-up, and still noisy.

    python bench/learner_throughput.py                 # ~5-7 minutes on 2 cores
    python bench/learner_throughput.py --quick         # fewer steps, batch 32 and 256 only
    python bench/learner_throughput.py --shape d_model=128,n_heads=4     # another model shape beside tiny
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: spinning OpenMP threads stall each other

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from learner.config import ModelConfig  # noqa: E402
from learner.features import build_context_batch  # noqa: E402
from learner.flops import training_flops_per_sample  # noqa: E402
from learner.model import LazyDecoder  # noqa: E402
from learner.ops import autocast_dtype  # noqa: E402
from learner.step import StepBatch, StepWeights, train_step  # noqa: E402
from learner.synthetic import random_code_tokenizer, random_context  # noqa: E402

N_ITEMS = 20_000
N_SHORT, N_LONG = 20, 100


def model_config(shape: dict | None = None) -> ModelConfig:
    cfg = ModelConfig.from_name("tiny")
    return cfg.replace(**shape) if shape else cfg


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best fp32 matmul rate at `threads` threads: (GFLOP per wall second, GFLOP per CPU second)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return 2 * n ** 3 / best / 1e9, 2 * n ** 3 / best_cpu / 1e9


def sample_dicts(cfg: ModelConfig, n: int, seed: int) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """n decoded samples as the learner gets them: context dicts, target items, logged log pi_old, advantages."""
    rng = np.random.default_rng(seed)
    item_ids = np.arange(N_ITEMS)
    contexts = [random_context(rng, cfg, item_ids, n_short=N_SHORT, n_long=N_LONG) for _ in range(n)]
    targets = rng.choice(item_ids, n)
    logp_old = rng.uniform(-9.0, -3.0, n)
    adv = rng.choice([-1.0, 0.0, 1.0], n, p=[0.3, 0.4, 0.3])
    return contexts, targets, logp_old, adv


def worker(rank: int, world: int, threads: int, batch: int, cfg: ModelConfig, min_steps: int, min_seconds: float,
           port: int, results) -> None:
    """Train `batch` rows a step (this worker's share) until min_steps and min_seconds; median times."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LazyDecoder(cfg)
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = StepWeights(algorithm="gbpo")
    tokenizer = random_code_tokenizer(N_ITEMS, cfg.codebook_size)
    n_batches = 4
    contexts, targets, logp_old, adv = sample_dicts(cfg, batch * n_batches, seed=1 + rank)
    feat, step, cpu = [], [], []
    started = None
    i = 0
    while i < 2 + min_steps or time.perf_counter() - started < min_seconds:
        rows = slice((i % n_batches) * batch, (i % n_batches + 1) * batch)
        t0 = time.perf_counter()
        ctx = build_context_batch(contexts[rows], tokenizer, cfg)
        sb = StepBatch(ctx, torch.from_numpy(tokenizer.codes_for(targets[rows])),
                       logp_old=torch.from_numpy(logp_old[rows]).float(), adv=torch.from_numpy(adv[rows]).float())
        t1, c1 = time.perf_counter(), time.process_time()
        result = train_step(model, optimizer, sb, weights=weights)
        t2, c2 = time.perf_counter(), time.process_time()
        if not result.finite:
            raise RuntimeError(f"bench: non-finite loss at step {i}")
        if i == 2:
            started = time.perf_counter()
        if i >= 2:
            feat.append(t1 - t0)
            step.append(t2 - t1)
            cpu.append(c2 - c1)
        i += 1
    out = {"featurize_ms": 1000 * statistics.median(feat), "step_ms": 1000 * statistics.median(step),
           "step_cpu_ms": 1000 * statistics.median(cpu),
           "steps": len(step), "n_context": ctx.n_tokens}
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if results is None:
        return out
    results.put((rank, out))


def run_workers(world: int, threads: int, batch: int, cfg: ModelConfig, min_steps: int, min_seconds: float) -> dict:
    """`world` processes of `threads` threads, `batch` rows each; the slowest rank's medians."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, threads, batch, cfg, min_steps, min_seconds, port, results))
             for r in range(world)]
    for p in procs:
        p.start()
    outs = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"bench worker exited with {p.exitcode}")
    slowest = max(outs.values(), key=lambda o: o["featurize_ms"] + o["step_ms"])
    return {**summarize(slowest, world * batch), "step_cpu_ms_all_workers": sum(o["step_cpu_ms"] for o in outs.values())}


def summarize(out: dict, global_batch: int) -> dict:
    total = out["featurize_ms"] + out["step_ms"]
    return {**out, "batch": global_batch, "step_samples_per_s": 1000 * global_batch / out["step_ms"],
            "samples_per_s": 1000 * global_batch / total}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_sweep(cfg: ModelConfig, batches: list[int], threads: int, min_steps: int, min_seconds: float) -> dict:
    """One worker in this process; the matmul peak is measured just before and after each batch
    size (the larger one counts), so that load from other processes hits both alike."""
    flops = training_flops_per_sample("lazy", cfg, cfg.profile_fields + N_SHORT + N_LONG)
    rows = {}
    for b in batches:
        before, before_cpu = matmul_gflops(threads)
        row = summarize(worker(0, 1, threads, b, cfg, min_steps, min_seconds, 0, None), b)
        after, after_cpu = matmul_gflops(threads)
        peak, peak_cpu = max(before, after), max(before_cpu, after_cpu)
        row["matmul_gflops"] = peak
        row["step_gflops"] = flops * row["step_samples_per_s"] / 1e9
        row["step_mfu"] = row["step_gflops"] / peak
        row["mfu_with_featurize"] = flops * row["samples_per_s"] / 1e9 / peak
        # the same in CPU time: the step's FLOPs per CPU second over the matmul's (less sensitive to the
        # time other processes take from this one)
        row["matmul_gflops_per_cpu_s"] = peak_cpu
        row["step_mfu_cpu_time"] = flops * b / (row["step_cpu_ms"] / 1000) / 1e9 / peak_cpu
        rows[str(b)] = row
    return {"train_gflops_per_sample": flops / 1e9, "threads": threads, "batches": rows}


def scaling(cfg: ModelConfig, rounds: int, min_steps: int, min_seconds: float) -> dict:
    """Global batch 256: 1 worker x 1 thread, 1 worker x 2 threads, 2 workers x 1 thread (128 rows each),
    run in turn `rounds` times; each configuration's best round counts (the least disturbed)."""
    cases = {"1_worker_1_thread": (1, 1, 256), "1_worker_2_threads": (1, 2, 256), "2_workers_1_thread": (2, 1, 128)}
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (world, threads, batch) in cases.items():
            runs[name].append(run_workers(world, threads, batch, cfg, min_steps, min_seconds))
    best = {name: max(r, key=lambda o: o["samples_per_s"]) for name, r in runs.items()}
    one_1t, one_2t, two_1t = best["1_worker_1_thread"], best["1_worker_2_threads"], best["2_workers_1_thread"]
    return {"global_batch": 256, "rounds": rounds, **best,
            "samples_per_s_per_round": {name: [o["samples_per_s"] for o in r] for name, r in runs.items()},
            "efficiency_2w_vs_1w1t": two_1t["samples_per_s"] / (2 * one_1t["samples_per_s"]),
            "speedup_2w_vs_1w2t": two_1t["samples_per_s"] / one_2t["samples_per_s"],
            "step_efficiency_2w_vs_1w1t": two_1t["step_samples_per_s"] / (2 * one_1t["step_samples_per_s"]),
            # CPU seconds per global step, 1 worker over 2 workers together: the data-parallel overhead
            # (all-reduce, smaller per-worker batches) without the waiting that other processes cause
            "cpu_efficiency_2w_vs_1w1t": one_1t["step_cpu_ms_all_workers"] / two_1t["step_cpu_ms_all_workers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shape", default="", help="extra model shape beside tiny, e.g. d_model=128,n_heads=4")
    parser.add_argument("--threads", default="1,2", help="thread counts of the one-worker batch sweep")
    args = parser.parse_args()
    min_steps, min_seconds = (3, 3.0) if args.quick else (5, 6.0)
    batches = [32, 256] if args.quick else [32, 256, 1024]
    cfg = model_config()
    out = {"preset": "tiny", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "autocast": str(autocast_dtype("cpu")), "torch": torch.__version__}
    threads = [int(t) for t in args.threads.split(",")]
    out["tiny"] = {f"{t}_thread": batch_sweep(cfg, batches, t, min_steps, min_seconds) for t in threads}
    if args.shape:
        shape = {k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(","))}
        out["shape"] = {"overrides": shape, **{f"{t}_thread": batch_sweep(model_config(shape), [256], t, min_steps,
                                                                           min_seconds) for t in threads}}
    out["scaling"] = scaling(cfg, 1 if args.quick else 2, min_steps, min_seconds)
    out["targets"] = {**{f"step_mfu_256_{t}_thread": out["tiny"][f"{t}_thread"]["batches"]["256"]["step_mfu"]
                         for t in threads}, "step_mfu_256_target": 0.30,
                      "efficiency_2w_vs_1w1t": out["scaling"]["efficiency_2w_vs_1w1t"], "efficiency_target": 0.8}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
