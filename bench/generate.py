"""Serving latency: one request, beam 512, a context of 3000 items, for `tiny` and a ~0.1B model.

Prints ONE JSON object. Per config: p50 / p99 latency of a whole request (featurize the user
context, process it once, 3-level trie-constrained beam search, top-k items with logprobs), the
useful FLOPs of that request (learner.flops.generation_flops: context processor once + 1 + W + W
decoder token-passes with the incremental self-attention cache), the achieved FLOP/s, and
`cpu_mfu` = achieved FLOP/s (at p50) / median FLOP/s of a large matmul (2048^2 x 2048, one
before each request) measured in the same run
and dtype. Target: cpu_mfu >= 0.25 for the 0.1B config (Table 5's d_model 640, 12 layers,
10 heads; the report serves at 62% MFU on a GPU).

Catalogue: 200k items (131k for tiny's 64^3 codes) with random unique semantic ids:
every level keeps 512 beams. Both configs run in float32 by default: this machine's torch reports
"CPU capability usage: AVX2" and runs bf16 matmuls at ~0.5 GFLOP/s (40x slower than fp32);
`--dtype bfloat16` runs the 0.1B config in bf16 where a CPU has native bf16 (the matmul baseline
always uses the same dtype). OMP_WAIT_POLICY=PASSIVE because the 2 cores are shared: spinning
OpenMP threads otherwise stall each other.

On a GPU (`--device cuda`) the 0.1B config is measured in bf16 and, in the same run, with its
Linear layers quantized to FP8: `fp8` is what serves (`quantize_model(model, "fp8",
rule=SERVING_FP8_RULE)`: the fused per-row activation quantization, fp8 only for the wide Linears
in calls of many rows), `fp8_unfused` is every Linear in fp8 with the reference (unfused)
activation quantization, the path before the fused kernel. Each is measured for one request per
beam search and for batches of requests (`--batch`: B requests share one search, B x 512 beams per
level; latency is that of the whole batch, which each of its requests waits for); the models take
turns on the same requests, so drift in the machine's load hits them alike. `mfu` = achieved
FLOP/s at p50 / a large bf16 matmul's FLOP/s; for fp8 also against a large row-scaled fp8
`_scaled_mm` (`mfu_vs_fp8_peak`), both measured in the same run (CUDA events, after warm-up).
Timings synchronize the device before reading the clock. `search_p50_ms` leaves out the
featurization (CPU work that happens before the context reaches the GPU, the noisiest part);
`speedup_vs_bf16_search_p50` (> 1: faster than bf16) compares searches, and each row's
`search_speedup_vs_bf16_paired` is the median of the per-request ratios.

    python bench/generate.py           # ~2-3 minutes on 2 cores
    python bench/generate.py --quick   # fewer requests
    python bench/generate.py --device cuda [--quant both] [--batch 1 16 64] [--config 0.1B]
    python bench/generate.py --serve-dtypes fp32 int8 bf16   # serve.dtype vs fp32 (key serve_dtype)

`serve_dtype` (CPU): each serve.dtype as the replicas serve it, on the same requests as fp32, beam 512:
requests/s, p99, `speedup_vs_fp32`, `topk_overlap_vs_fp32` (top-10); the target (>= 1.9x the fp32
requests/s with overlap >= 0.95) needs a CPU with AVX-512 BF16 / VNNI.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learner.beam import beam_search  # noqa: E402
from learner.config import ModelConfig  # noqa: E402
from learner.features import build_context_batch  # noqa: E402
from learner.flops import generation_flops  # noqa: E402
from learner.model import LazyDecoder  # noqa: E402
from learner.quant import FP8, SERVING_FP8_RULE, quantize_model  # noqa: E402
from learner.synthetic import random_code_tokenizer, random_context  # noqa: E402

N_CONTEXT_ITEMS = 3000
N_SHORT = 64
BEAM = 512
MATMUL_N = 2048
GPU_MATMUL_N = 8192
TOP_K = 10


def matmul_flops_per_s(a: torch.Tensor, b: torch.Tensor) -> float:
    t0 = time.perf_counter()
    torch.mm(a, b)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0)


def beams_per_level(cfg: ModelConfig, trie, beam: int) -> tuple[int, int, int]:
    """Rows fed to the decoder at each level, as beam_search sizes them."""
    w1 = min(beam, cfg.codebook_size)
    w2 = min(beam, w1 * cfg.codebook_size)
    return 1, w1, w2


def run_config(name: str, cfg: ModelConfig, dtype: torch.dtype, n_requests: int) -> dict:
    """Requests interleaved with large-matmul measurements (one before each request), so that the
    load other processes put on the shared cores affects both sides of the MFU ratio alike."""
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    torch.mm(a, b)
    peaks = []
    torch.manual_seed(0)
    model = LazyDecoder(cfg).eval().to(dtype)
    tok = random_code_tokenizer(min(200_000, cfg.codebook_size ** 3 // 2), cfg.codebook_size, seed=1)
    trie = tok.trie()
    rng = np.random.default_rng(0)
    contexts = [random_context(rng, cfg, tok.item_ids, n_short=N_SHORT, n_long=N_CONTEXT_ITEMS - N_SHORT)
                for _ in range(n_requests + 1)]
    latencies = []
    for i, context in enumerate(contexts):
        peaks.append(matmul_flops_per_s(a, b))
        t0 = time.perf_counter()
        ctx = build_context_batch([context], tok, cfg)
        recs = beam_search(model, ctx, trie, beam_width=BEAM, top_k=TOP_K)
        if i:                                      # the first request warms up
            latencies.append(time.perf_counter() - t0)
        assert len(set(recs.item_ids[0].tolist())) == TOP_K
    n_tokens = cfg.profile_fields + N_CONTEXT_ITEMS
    flops = generation_flops(cfg, n_tokens, beams_per_level=beams_per_level(cfg, trie, BEAM))
    p50 = float(np.percentile(latencies, 50))
    achieved = flops / p50
    peak = float(np.median(peaks))
    return {"params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", ""),
            "context_tokens": n_tokens, "beam_width": BEAM, "top_k": TOP_K, "requests": len(latencies),
            "p50_ms": 1000 * p50, "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "gflops_per_request": flops / 1e9, "achieved_gflop_per_s": achieved / 1e9,
            "matmul_gflop_per_s": peak / 1e9, "cpu_mfu": achieved / peak}


def run_serve_dtypes(cfg: ModelConfig, dtypes: list[str], n_requests: int) -> dict:
    """serve.dtype as the replicas serve it (learner.quant.prepare_for_serving of the same float32
    weights), at beam 512 on the same requests, the dtypes taking turns on each request so that the
    shared cores' load hits them alike. Per dtype: requests/s (n / summed latency), p50 / p99,
    `speedup_vs_fp32` (requests/s over fp32's), `topk_overlap_vs_fp32` (|top-10 ∩ fp32's top-10| / 10,
    mean over requests) and `prepare_s` (the conversion a push pays)."""
    import copy

    from learner.quant import prepare_for_serving, serving_dtype_support

    torch.manual_seed(0)
    base = LazyDecoder(cfg).eval()
    models, out = {}, {"cpu": serving_dtype_support("fp32")[1], "beam_width": BEAM, "top_k": TOP_K}
    for dtype in ["fp32", *[d for d in dtypes if d != "fp32"]]:
        t0 = time.perf_counter()
        models[dtype] = prepare_for_serving(copy.deepcopy(base), dtype)
        out[dtype] = {"prepare_s": time.perf_counter() - t0, "fast_here": serving_dtype_support(dtype)[0]}
    tok = random_code_tokenizer(min(200_000, cfg.codebook_size ** 3 // 2), cfg.codebook_size, seed=1)
    trie = tok.trie()
    rng = np.random.default_rng(0)
    contexts = [random_context(rng, cfg, tok.item_ids, n_short=N_SHORT, n_long=N_CONTEXT_ITEMS - N_SHORT)
                for _ in range(n_requests + 1)]
    latencies = {d: [] for d in models}
    tops = {d: [] for d in models}
    for i, context in enumerate(contexts):
        for dtype, model in models.items():
            t0 = time.perf_counter()
            recs = beam_search(model, build_context_batch([context], tok, cfg), trie, beam_width=BEAM, top_k=TOP_K)
            if i:                                      # the first request warms up
                latencies[dtype].append(time.perf_counter() - t0)
                tops[dtype].append(set(recs.item_ids[0].tolist()))
    for dtype in models:
        lat = np.asarray(latencies[dtype])
        out[dtype].update({"requests": len(lat), "requests_per_s": len(lat) / lat.sum(),
                           "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
                           "topk_overlap_vs_fp32": float(np.mean([len(a & b) / TOP_K
                                                                  for a, b in zip(tops["fp32"], tops[dtype])]))})
    for dtype in models:
        out[dtype]["speedup_vs_fp32"] = out[dtype]["requests_per_s"] / out["fp32"]["requests_per_s"]
    best = max((d for d in models if d in ("bf16", "int8")), key=lambda d: out[d]["speedup_vs_fp32"], default=None)
    out["target_met_1.9x_at_overlap_0.95"] = bool(best and out[best]["speedup_vs_fp32"] >= 1.9
                                                 and out[best]["topk_overlap_vs_fp32"] >= 0.95)
    return out


def default_serve_dtypes() -> list[str]:
    """int8 always; bf16 only where this CPU runs it natively (otherwise each bf16 request takes minutes)."""
    from learner.quant import serving_dtype_support

    return ["fp32", "int8"] + (["bf16"] if serving_dtype_support("bf16")[0] else [])


def serve_dtype_section(args) -> dict:
    """The `serve_dtype` key: run_serve_dtypes on --serve-config (5 requests, 2 with --quick)."""
    cfg = ModelConfig.from_name(args.serve_config).replace(max_short=N_SHORT, max_long=N_CONTEXT_ITEMS - N_SHORT)
    out = run_serve_dtypes(cfg, args.serve_dtypes or default_serve_dtypes(), 2 if args.quick else 5)
    out["config"] = args.serve_config
    return out


def gpu_matmul_tflops(kind: str, n: int = GPU_MATMUL_N, reps: int = 20, rounds: int = 3) -> float:
    """Median over `rounds` of the TFLOP/s of `reps` (n x n) @ (n x n) products on the GPU: bf16
    `torch.mm`, or fp8 e4m3 `torch._scaled_mm` with row-wise scales and bf16 output (the same call
    learner.quant makes)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    if kind == "bf16":
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)

        def product():
            return torch.mm(a, b)
    elif kind == "fp8":
        a8, b8 = a.to(FP8), b.to(FP8).t().contiguous().t()        # row-major x column-major
        scale_a = torch.ones(n, 1, device=device)
        scale_b = torch.ones(1, n, device=device)

        def product():
            return torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    else:
        raise ValueError(f"kind: must be bf16 or fp8, got {kind!r}")
    for _ in range(3):
        product()
    results = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            product()
        end.record()
        torch.cuda.synchronize()
        results.append(2 * n ** 3 * reps / (start.elapsed_time(end) / 1000) / 1e12)
    return float(np.median(results))


def cuda_models(base: torch.nn.Module, quants: list[str]) -> dict[str, torch.nn.Module]:
    """The weight formats measured: bf16; fp8 as served (fused activation quantization,
    SERVING_FP8_RULE); fp8_unfused (every Linear, the reference activation quantization: the
    path before the fused kernel), in the same run."""
    models = {"bf16": base} if "bf16" in quants else {}
    if "fp8" in quants:
        models["fp8"] = quantize_model(base, "fp8", rule=SERVING_FP8_RULE)
        models["fp8_unfused"] = quantize_model(base, "fp8", activation_kernel="reference")
    return models


def run_config_cuda(cfg: ModelConfig, base: torch.nn.Module, models: dict[str, torch.nn.Module],
                    batches: list[int], n_requests: int) -> dict:
    """One preset (0.1B by default) on the GPU: for each request batch, `n_requests` timed searches
    of each model after 2 warm-ups, the models taking turns on the same requests.
    `base` is the bf16 model the others were made from."""
    device = torch.device("cuda")
    tok = random_code_tokenizer(min(200_000, cfg.codebook_size ** 3 // 2), cfg.codebook_size, seed=1)
    trie = tok.trie().to(device)
    rng = np.random.default_rng(0)
    contexts = [random_context(rng, cfg, tok.item_ids, n_short=N_SHORT, n_long=N_CONTEXT_ITEMS - N_SHORT)
                for _ in range(max(batches) * 2)]
    n_tokens = cfg.profile_fields + N_CONTEXT_ITEMS
    flops_per_request = generation_flops(cfg, n_tokens, beams_per_level=beams_per_level(cfg, trie, BEAM))
    out = {"params": sum(p.numel() for p in base.parameters()), "context_tokens": n_tokens, "beam_width": BEAM,
           "top_k": TOP_K, "gflops_per_request": flops_per_request / 1e9}
    for name in models:
        out[name] = {}
    for b in batches:
        latencies = {name: [] for name in models}
        search = {name: [] for name in models}
        for i in range(n_requests + 2):                           # the first 2 warm up
            group = [contexts[(i * b + j) % len(contexts)] for j in range(b)]
            for name, model in models.items():                   # interleaved: drift hits all alike
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ctx = build_context_batch(group, tok, cfg).to(device)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                recs = beam_search(model, ctx, trie, beam_width=BEAM, top_k=TOP_K)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                if i >= 2:
                    latencies[name].append(t2 - t0)
                    search[name].append(t2 - t1)
                assert all(len(set(row)) == TOP_K for row in recs.item_ids.tolist())
        for name in models:
            p50, search_p50 = float(np.percentile(latencies[name], 50)), float(np.percentile(search[name], 50))
            out[name][f"batch_{b}"] = {
                "requests_per_search": b, "searches": len(latencies[name]),
                "p50_ms": 1000 * p50, "p99_ms": 1000 * float(np.percentile(latencies[name], 99)),
                "search_p50_ms": 1000 * search_p50, "search_p99_ms": 1000 * float(np.percentile(search[name], 99)),
                "requests_per_s": b / p50, "achieved_tflop_per_s": b * flops_per_request / p50 / 1e12,
                "search_tflop_per_s": b * flops_per_request / search_p50 / 1e12}
            if "bf16" in models:        # paired: each search against bf16's on the same requests
                out[name][f"batch_{b}"]["search_speedup_vs_bf16_paired"] = float(np.median(
                    np.asarray(search["bf16"]) / np.asarray(search[name])))
    return out


def summarize_cuda(out: dict, result: dict) -> dict:
    """mfu per row (against the large bf16 / fp8 matmuls measured in the run) and, per model,
    bf16 p50 / model p50 (> 1: faster than bf16) for whole requests and for the search alone."""
    names = [k for k in result if isinstance(result[k], dict)]
    peak_bf16, peak_fp8 = out["matmul_bf16_tflop_per_s"], out["matmul_fp8_tflop_per_s"]
    for name in names:
        for row in result[name].values():
            row["mfu"] = row["achieved_tflop_per_s"] / peak_bf16
            row["search_mfu"] = row["search_tflop_per_s"] / peak_bf16
            if name != "bf16":
                row["mfu_vs_fp8_peak"] = row["achieved_tflop_per_s"] / peak_fp8
                row["search_mfu_vs_fp8_peak"] = row["search_tflop_per_s"] / peak_fp8
    out["p99_ms"] = {name: {k: row["p99_ms"] for k, row in result[name].items()} for name in names}
    out["mfu"] = {name: {k: row["mfu"] for k, row in result[name].items()} for name in names}
    if "bf16" in names:
        for name in names:
            if name == "bf16":
                continue
            out.setdefault("speedup_vs_bf16_p50", {})[name] = {
                k: result["bf16"][k]["p50_ms"] / row["p50_ms"] for k, row in result[name].items()}
            out.setdefault("speedup_vs_bf16_search_p50", {})[name] = {
                k: result["bf16"][k]["search_p50_ms"] / row["search_p50_ms"] for k, row in result[name].items()}
    return out


def main_cuda(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    quants = ["bf16", "fp8"] if args.quant == "both" else ["fp8" if args.quant == "fp8" else "bf16"]
    batches = args.batch or [1, 16, 64]
    out = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "matmul_n": GPU_MATMUL_N, "matmul_bf16_tflop_per_s": gpu_matmul_tflops("bf16"),
           "matmul_fp8_tflop_per_s": gpu_matmul_tflops("fp8")}
    cfg = ModelConfig.from_name(args.config).replace(max_short=N_SHORT, max_long=N_CONTEXT_ITEMS - N_SHORT)
    torch.manual_seed(0)
    base = LazyDecoder(cfg).eval().to(device=torch.device("cuda"), dtype=torch.bfloat16)
    result = run_config_cuda(cfg, base, cuda_models(base, quants), batches, 10 if args.quick else 40)
    out["config"] = args.config
    out[args.config] = result
    out["fp8_rule"] = {"min_out_features": SERVING_FP8_RULE.min_out_features, "min_rows": SERVING_FP8_RULE.min_rows}
    return summarize_cuda(out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="cpu: dtype of the 0.1B run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quant", choices=["none", "fp8", "both"], default=None,
                        help="cuda: bf16 (none), fp8 (and fp8_unfused) or both in one run (default both); "
                             "cpu: none only")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="cuda: requests per beam search, one measurement each (default 1 16 64)")
    parser.add_argument("--config", default="0.1B", help="cuda: the model preset measured (default 0.1B)")
    parser.add_argument("--serve-dtypes", nargs="+", choices=["fp32", "bf16", "int8"], default=None,
                        help="cpu: serve.dtype values measured against fp32 in the same run, key serve_dtype "
                             "(default fp32 int8, + bf16 where the CPU has AVX-512 BF16)")
    parser.add_argument("--no-serve-dtypes", action="store_true", help="cpu: skip the serve.dtype measurement")
    parser.add_argument("--serve-config", default="0.1B", help="cpu: the preset of the serve.dtype measurement")
    parser.add_argument("--serve-only", action="store_true", help="cpu: only the serve.dtype measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.device == "cuda":
        args.quant = args.quant or "both"
        out = main_cuda(args)
        out["wall_s"] = time.perf_counter() - t0
        print(json.dumps(out, indent=1))
        return
    if args.quant not in (None, "none") or args.batch or args.config != "0.1B":
        parser.error("--quant, --batch and --config apply to --device cuda "
                     "(fp8 on the CPU is an emulation, not a speed-up)")
    out = {"device": "cpu", "threads": args.threads}
    if args.serve_only:
        out["serve_dtype"] = serve_dtype_section(args)
        out["wall_s"] = time.perf_counter() - t0
        print(json.dumps(out, indent=1))
        return
    small_dtype = getattr(torch, args.dtype)
    tiny = ModelConfig.from_name("tiny").replace(max_short=N_SHORT, max_long=N_CONTEXT_ITEMS - N_SHORT)
    out["tiny"] = run_config("tiny", tiny, torch.float32, 5 if args.quick else 20)
    small = ModelConfig.from_name("0.1B").replace(max_short=N_SHORT, max_long=N_CONTEXT_ITEMS - N_SHORT)
    out["0.1B"] = run_config("0.1B", small, small_dtype, 2 if args.quick else 5)
    out["cpu_mfu"] = out["0.1B"]["cpu_mfu"]
    out["p99_ms"] = {"tiny": out["tiny"]["p99_ms"], "0.1B": out["0.1B"]["p99_ms"]}
    out["target_met_cpu_mfu_ge_0.25"] = out["cpu_mfu"] >= 0.25
    if not args.no_serve_dtypes:
        out["serve_dtype"] = serve_dtype_section(args)
    out["wall_s"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
