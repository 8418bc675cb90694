"""`onerec eval`: offline evaluation of the lazy decoder against baselines on the same split.

Invariant: every method in one run sees the same split and the same training data; nothing of a test
(or validation) item reaches training: semantic ids, item embeddings and popularity come from the
training part only.

    onerec eval sequences FILE [--time-budget 1200] [--json]   # leave-one-out, SASRec/TIGER protocol
    onerec eval replay [LOG] [--out DIR] [--json]              # prequential on a KuaiRand log
    onerec eval make-sequences OUT --source synthetic|kuairand # files in the `sequences` format

`sequences` (issue 5, part 1): FILE holds one user per line, `user_id item_id item_id ...` in time
order. The last item is the test target, the one before it the validation target, the rest trains.
Items have no features, so the tokenizer's item embeddings are a truncated SVD of the positive PMI of
item co-occurrence (within `COOC_WINDOW` positions) in the training sequences. Contexts are the
previous items as short/long behaviour with zero durations, play times and flags and an all-zero
profile. Baselines: most popular (training counts) and a SASRec-style causal transformer over item
ids trained with sampled softmax for the same time budget. Both learned models are scored on the
validation item of up to 1,000 users ten times during training and keep their best weights (model
selection on validation, as in the SASRec and TIGER protocols); the test item is scored once, at the end. Recall@K is the hit rate of the one target
(as in the SASRec and TIGER tables), NDCG@K with one relevant item; ranking is over all items.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from learner.config import ModelConfig
from learner.tokenizer import SemanticTokenizer
from offline.replay_eval import eval_replay, plot_replay
from offline.sequences import (KS, codebook_sizes_for, cooccurrence_embeddings, kuairand_sequences, leave_one_out,
                               read_sequences, scores, synthetic_sequences, write_sequences)
from offline.trainers import recommend_lazy, recommend_popular, recommend_sasrec, train_lazy_decoder, train_sasrec


def eval_sequences(path: str | Path, cfg: ModelConfig, *, time_budget_s: float, sasrec_budget_s: float,
                   beam_width: int, lr: float, batch_size: int, device: str, seed: int = 0,
                   max_steps: int | None = None) -> dict:
    """The whole protocol; returns {"model", "popular", "sasrec": {recall@5, recall@10, ndcg@5, ndcg@10}}
    and, under "info", the split and training sizes."""
    split = leave_one_out(read_sequences(path))
    item_ids = split.train_items()
    item_index = {int(v): i for i, v in enumerate(item_ids)}
    emb = cooccurrence_embeddings(split.train, item_ids, seed=seed)
    sizes = codebook_sizes_for(len(item_ids), cfg)
    tokenizer = SemanticTokenizer()
    report = tokenizer.fit(item_ids, emb, codebook_sizes=sizes, seed=seed)
    histories = [split.test_history(u) for u in range(len(split.users))]
    top_k = max(KS)

    beam_width = max(beam_width, top_k)
    model, model_steps = train_lazy_decoder(split, tokenizer, cfg, time_budget_s=time_budget_s, lr=lr,
                                            batch_size=batch_size, device=device, beam_width=beam_width,
                                            seed=seed, max_steps=max_steps)
    ranked_model = recommend_lazy(model, tokenizer, histories, cfg, beam_width=beam_width, top_k=top_k)
    sasrec, sasrec_steps = train_sasrec(split, item_index, time_budget_s=sasrec_budget_s, lr=lr,
                                        batch_size=batch_size, device=device, seed=seed, max_steps=max_steps)
    ranked_sasrec = recommend_sasrec(sasrec, item_ids, item_index, histories, top_k=top_k)
    ranked_popular = recommend_popular(split.train, len(split.users), top_k=top_k)
    return {
        "model": scores(ranked_model, split.test_target),
        "popular": scores(ranked_popular, split.test_target),
        "sasrec": scores(ranked_sasrec, split.test_target),
        "info": {"users": len(split.users), "train_items": len(item_ids),
                 "test_targets_unseen_in_training": float(np.mean([t not in item_index for t in split.test_target])),
                 "codebook_sizes": list(sizes), "tokenizer_collision_rate": report.collision_rate,
                 "model_steps": model_steps, "sasrec_steps": sasrec_steps, "device": device,
                 "time_budget_s": time_budget_s, "beam_width": beam_width, "preset": cfg.name},
    }


# ----------------------------------------------------------------------------------- replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{sequences,replay,make-sequences}")
    seq = sub.add_parser("sequences", help="leave-one-out next-item evaluation on a `user item item ...` file")
    seq.add_argument("file", help="one user per line: user_id item_id item_id ... in time order")
    seq.add_argument("--time-budget", type=float, default=1200.0, help="seconds of training for the lazy decoder")
    seq.add_argument("--sasrec-time-budget", type=float, default=None,
                     help="seconds of training for SASRec (default: the same as --time-budget)")
    seq.add_argument("--beam-width", type=int, default=50)
    seq.add_argument("--lr", type=float, default=3e-3)
    seq.add_argument("--batch-size", type=int, default=256)
    seq.add_argument("--max-steps", type=int, default=None, help="stop earlier after this many steps (tests)")
    seq.add_argument("--seed", type=int, default=0)
    seq.add_argument("--json", action="store_true", help="print one JSON object {model, popular, sasrec}")

    rep = sub.add_parser("replay", help="prequential evaluation on a KuaiRand log (score, then train)")
    rep.add_argument("log", nargs="?", default=None, help="KuaiRand standard log csv(.gz) (default: the shipped week)")
    rep.add_argument("--out", default="eval-replay", help="folder for replay.json and replay.png")
    rep.add_argument("--limit", type=int, default=None, help="read only the first N rows of the log")
    rep.add_argument("--k", type=int, default=10)
    rep.add_argument("--beam-width", type=int, default=20)
    rep.add_argument("--train-every", type=int, default=64, help="train after every N requests")
    rep.add_argument("--gap-s", type=float, default=60.0,
                     help="rows of a user within this many seconds form one request")
    rep.add_argument("--lr", type=float, default=1e-3)
    rep.add_argument("--batch-size", type=int, default=64)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--json", action="store_true")

    make = sub.add_parser("make-sequences", help="write a sequences file (synthetic or from KuaiRand)")
    make.add_argument("out")
    make.add_argument("--source", choices=("synthetic", "kuairand"), default="synthetic")
    make.add_argument("--users", type=int, default=1000)
    make.add_argument("--items", type=int, default=300)
    make.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace, cfg) -> int:
    command = getattr(args, "eval_command", None)
    try:
        if command == "sequences":
            return _main_sequences(args, cfg)
        if command == "replay":
            return _main_replay(args, cfg)
        if command == "make-sequences":
            seqs = (synthetic_sequences(args.users, args.items, seed=args.seed) if args.source == "synthetic"
                    else kuairand_sequences())
            write_sequences(seqs, args.out)
            print(f"wrote {len(seqs)} users to {args.out}", file=sys.stderr)
            return 0
    except (ValueError, OSError) as exc:
        print(f"onerec eval {command}: {exc}", file=sys.stderr)
        return 2
    print("onerec eval: choose `sequences FILE`, `replay [LOG]` or `make-sequences OUT`", file=sys.stderr)
    return 2


def _main_replay(args: argparse.Namespace, cfg) -> int:
    from simulator import kuairand

    log = kuairand.read_log(args.log, limit=args.limit)
    result = eval_replay(log, cfg.model, k=args.k, beam_width=max(args.beam_width, args.k),
                         train_every=args.train_every, batch_size=args.batch_size, lr=args.lr,
                         device=cfg.train.resolve_device(), gap_s=args.gap_s, beta=cfg.stream.duration_beta,
                         seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result, indent=1))
    plot_replay(result, out / "replay.png")
    print(f"wrote {out / 'replay.json'} and {out / 'replay.png'}", file=sys.stderr)
    if args.json:
        print(json.dumps(result["final"]))
    else:
        k = args.k
        print(f"{result['info']['requests']} requests, {result['info']['trained_pairs']} trained pairs")
        print(f"{'':10s}{'recall@' + str(k):>11s}{'mean q':>9s}{'shown':>8s}")
        for name in ("model", "popular"):
            f = result["final"][name]
            q = "-" if f["mean_q"] is None else f"{f['mean_q']:.3f}"
            print(f"{name:10s}{f[f'recall@{k}']:11.4f}{q:>9s}{f['shown_share']:8.4f}")
    return 0


def _main_sequences(args: argparse.Namespace, cfg) -> int:
    device = cfg.train.resolve_device()
    result = eval_sequences(
        args.file, cfg.model, time_budget_s=args.time_budget,
        sasrec_budget_s=args.time_budget if args.sasrec_time_budget is None else args.sasrec_time_budget,
        beam_width=args.beam_width, lr=args.lr, batch_size=args.batch_size, device=device, seed=args.seed,
        max_steps=args.max_steps)
    info = result.pop("info")
    print(json.dumps(info), file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'':10s}" + "".join(f"{k:>11s}" for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")))
        for name in ("model", "popular", "sasrec"):
            print(f"{name:10s}" + "".join(f"{result[name][k]:11.4f}" for k in result[name]))
    return 0
