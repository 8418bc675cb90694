"""Lazy decoder vs encoder-decoder vs naive decoder-only at equal parameter count (report Tables 1-2).

Prints ONE JSON object. For context lengths 512 and 3000 and each architecture: parameters,
analytic GFLOPs per training sample (learner.flops, exact matmul count), counted GFLOPs
(FlopCounterMode on the reference attention path, one sample; skipped for the naive decoder at
3000, whose reference attention would need ~4 GB) and the measured training-step time (forward,
backward, AdamW; fused attention; median of timed steps after a warm-up). Ratios are lazy divided
by encoder-decoder (and by naive); targets: flops ratio <= 0.10, step-time ratio <= 0.20 at 512.

Equal parameters: the lazy decoder has N blocks of 6 d^2 + F; the encoder-decoder N/2 + N/2
blocks (4 d^2 + F and 8 d^2 + F), the naive decoder-only round(N (6 d^2 + F) / (4 d^2 + F)) blocks
(`learner.baselines.equal_param_layers`). Same context embedder, token embedding and heads.

    python bench/architectures.py              # ~2-3 minutes on 2 cores
    python bench/architectures.py --quick      # 512 only, fewer steps
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: spinning OpenMP threads stall each other

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learner.baselines import EncoderDecoder, NaiveDecoderOnly, equal_param_layers  # noqa: E402
from learner.config import ModelConfig  # noqa: E402
from learner.features import build_context_batch  # noqa: E402
from learner.flops import (counted_flops, encoder_decoder_forward_flops, lazy_forward_flops,  # noqa: E402
                           naive_forward_flops)
from learner.model import LazyDecoder  # noqa: E402
from learner.synthetic import random_catalogue, random_context  # noqa: E402

PROFILE_FIELDS = 26
N_SHORT = 64


def bench_config(n_context: int) -> ModelConfig:
    """A ~10M-parameter model (d_model 256, 8 lazy blocks) holding exactly n_context context tokens."""
    return ModelConfig.from_name("tiny").replace(
        name="bench", d_model=256, n_layers=8, n_heads=4, codebook_size=256, embed_dim=16,
        profile_fields=PROFILE_FIELDS, max_short=N_SHORT, max_long=n_context - PROFILE_FIELDS - N_SHORT,
        item_hash_buckets=8192)


def make_batch(cfg: ModelConfig, tok, item_ids, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    contexts = [random_context(rng, cfg, item_ids, n_short=cfg.max_short, n_long=cfg.max_long) for _ in range(batch)]
    ctx = build_context_batch(contexts, tok, cfg)
    targets = torch.from_numpy(tok.codes_for(rng.choice(item_ids, batch)))
    return ctx, targets


def step_times_ms(models: dict, ctx, targets, steps: int) -> dict[str, float]:
    """Median training-step time per model; steps interleave the models so that load from other
    processes on the shared machine hits all of them alike. The first step of each is a warm-up."""
    opts = {}
    for name, model in models.items():
        model.attn_impl = "sdpa"
        opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            loss = model.loss(ctx, targets)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def counted_train_gflops(model, ctx, targets) -> float:
    model.attn_impl = "reference"
    flops = counted_flops(lambda: model.loss(ctx.index_select([0]), targets[:1]).backward())
    model.zero_grad(set_to_none=True)
    return flops / 1e9


def run_context(n_context: int, *, batch: int, steps: int, tok, item_ids) -> dict:
    cfg = bench_config(n_context)
    layers = equal_param_layers(cfg)
    torch.manual_seed(0)
    models = {"lazy": LazyDecoder(cfg), "encoder_decoder": EncoderDecoder(cfg), "naive": NaiveDecoderOnly(cfg)}
    analytic = {
        "lazy": lazy_forward_flops(cfg, n_context)["total"],
        "encoder_decoder": encoder_decoder_forward_flops(cfg, n_context, n_encoder=layers["encoder"],
                                                         n_decoder=layers["decoder"])["total"],
        "naive": naive_forward_flops(cfg, n_context, n_layers=layers["naive"])["total"],
    }
    ctx, targets = make_batch(cfg, tok, item_ids, batch)
    assert ctx.n_tokens == n_context
    out = {"batch": batch, "layers": {"lazy": cfg.n_layers, **layers}}
    for name, model in models.items():
        row = {"params": sum(p.numel() for p in model.parameters()),
               "analytic_gflops_per_sample": 3 * analytic[name] / 1e9}
        if name == "naive" and n_context > 1024:
            row["counted_gflops_per_sample"] = None
        else:
            row["counted_gflops_per_sample"] = counted_train_gflops(model, ctx, targets)
        out[name] = row
    for name, ms in step_times_ms(models, ctx, targets, steps).items():
        out[name]["step_ms"] = ms
        out[name]["step_ms_per_sample"] = ms / batch
    for other in ("encoder_decoder", "naive"):
        short = "encdec" if other == "encoder_decoder" else other
        out[f"flops_ratio_lazy_vs_{short}"] = analytic["lazy"] / analytic[other]
        out[f"step_time_ratio_lazy_vs_{short}"] = out["lazy"]["step_ms"] / out[other]["step_ms"]
        out[f"param_ratio_{short}_vs_lazy"] = out[other]["params"] / out["lazy"]["params"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="context 512 only, 2 timed steps")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    item_ids, _, tok = random_catalogue(4000, dim=16, codebook_size=256, seed=0, n_clusters=32)
    t0 = time.perf_counter()
    results = {"device": "cpu", "threads": args.threads, "dtype": "float32"}
    results["context_512"] = run_context(512, batch=8, steps=2 if args.quick else 5, tok=tok, item_ids=item_ids)
    if not args.quick:
        results["context_3000"] = run_context(3000, batch=1, steps=2, tok=tok, item_ids=item_ids)
    main_ctx = results["context_512"]
    results["flops_ratio_lazy_vs_encdec"] = main_ctx["flops_ratio_lazy_vs_encdec"]
    results["step_time_ratio_lazy_vs_encdec"] = main_ctx["step_time_ratio_lazy_vs_encdec"]
    results["targets_met"] = {"flops_ratio_le_0.10": main_ctx["flops_ratio_lazy_vs_encdec"] <= 0.10,
                              "step_time_ratio_le_0.20": main_ctx["step_time_ratio_lazy_vs_encdec"] <= 0.20}
    results["wall_s"] = time.perf_counter() - t0
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
