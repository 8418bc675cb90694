"""`onerec pretrain`: fit the tokenizer and train the model on the KuaiRand week for a bounded time.

Invariant: training pairs are built in time order with the history as it was BEFORE each request
(no leakage of the request's own items into its context), and every log row is accounted for:
it becomes a training target or is counted under a named reason (printed at the end).

Tokenizer: RQ-KMeans with `model.codebook_size` codes per level on `kuairand.item_embeddings(log)`
(items watched by the same users close together via PPMI co-occurrence + SVD, plus a content part
from the video features so never-watched items still get a sensible id; see its docstring).

Pairs: requests come from `kuairand.group_requests`; for each request the context is
`UserHistory.context(user)` before the request and each watched item (play time > 0) is one target;
after the request its watched rows enter the user's history. Pairs pass through a shuffle buffer
(streaming order with local shuffling) into batches of `train.batch_size`; when the log runs out
before the time budget, a new pass starts with fresh histories.

Output: a checkpoint folder `<out>/step-XXXXXXXX/` (model.safetensors, tokenizer.safetensors,
manifest.json) in the `learner.checkpoint.CheckpointStore` format, so `loop.init_from` can start from it.

    onerec pretrain --time-budget 60 --out runs/pretrain
"""
from __future__ import annotations

import collections
import dataclasses
import json
import random
import time
from typing import Iterator

import torch
from tqdm import tqdm

from learner.beam import beam_search
from learner.checkpoint import CheckpointStore
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.step import StepBatch, StepWeights, train_step
from learner.tokenizer import SemanticTokenizer
from simulator import kuairand


def add_arguments(parser) -> None:
    parser.add_argument("--time-budget", type=float, default=60.0, help="training seconds (default 60)")
    parser.add_argument("--out", default="runs/pretrain", help="checkpoint folder or fsspec URL (default runs/pretrain)")
    parser.add_argument("--log-limit", type=int, default=None, help="read only the first N log rows")
    parser.add_argument("--shuffle-buffer", type=int, default=4096, help="pairs held for local shuffling")
    parser.add_argument("--show-users", type=int, default=3, help="users to print recommendations for")
    parser.add_argument("--top-k", type=int, default=5, help="recommendations printed per user")
    parser.add_argument("--beam-width", type=int, default=64, help="beam width for the printed recommendations")


def training_pairs(log: kuairand.ImpressionLog, tokenizer: SemanticTokenizer, *, short_len: int, long_len: int,
                   stats: collections.Counter) -> Iterator[tuple[dict, int, int]]:
    """(context before the request, watched item id, user id) in time order; stats counts every row."""
    history = kuairand.UserHistory(short_len=short_len, long_len=max(long_len, 0))
    durations = log.duration_ms / 1000.0
    plays = log.play_time_ms / 1000.0
    for rows in kuairand.group_requests(log):
        user = int(log.user_id[rows[0]])
        context = history.context(user)
        watched = []
        for i in rows.tolist():
            item = int(log.video_id[i])
            stats["rows"] += 1
            if plays[i] <= 0:
                stats["skipped_not_watched"] += 1
                continue
            watched.append(i)
            if not tokenizer.lookup([item])[1][0]:
                stats["skipped_item_not_in_catalogue"] += 1
                continue
            stats["pairs"] += 1
            yield context, item, user
        for i in watched:
            history.record(user, int(log.video_id[i]), float(durations[i]), float(plays[i]), kuairand.flags_of(log, i))
        stats["requests"] += 1


def shuffled_batches(make_pairs, batch_size: int, buffer_size: int, rng: random.Random):
    """Endless batches from repeated passes of make_pairs(), shuffled within a bounded buffer."""
    buffer: list = []
    while True:
        produced = 0
        for pair in make_pairs():
            produced += 1
            buffer.append(pair)
            if len(buffer) >= buffer_size:
                rng.shuffle(buffer)
                while len(buffer) >= buffer_size // 2:
                    yield [buffer.pop() for _ in range(batch_size)]
        if produced == 0:
            raise ValueError("pretrain: the log produced no training pairs")


def main(args, cfg) -> int:
    model_cfg, train_cfg = kuairand.fit_profile(cfg.model), cfg.train   # contexts carry KuaiRand's profile
    if args.time_budget <= 0:
        raise ValueError(f"--time-budget must be > 0, got {args.time_budget}")
    torch.manual_seed(train_cfg.seed)
    rng = random.Random(train_cfg.seed)
    device = torch.device(train_cfg.resolve_device())

    log = kuairand.read_log(limit=args.log_limit)
    item_ids, emb = kuairand.item_embeddings(log)
    tokenizer = SemanticTokenizer()
    k = model_cfg.codebook_size
    report = tokenizer.fit(item_ids, emb, codebook_sizes=(k, k, k), seed=train_cfg.seed)
    print(f"tokenizer: {json.dumps(report.as_dict())}")

    model = LazyDecoder(model_cfg).to(device).train()
    weights = StepWeights.from_train(train_cfg, algorithm="sft")   # L_Gen only (eq. 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.base_lr(model_cfg.name), weight_decay=train_cfg.weight_decay)
    stats: collections.Counter = collections.Counter(
        {"rows": 0, "pairs": 0, "requests": 0, "skipped_not_watched": 0, "skipped_item_not_in_catalogue": 0})
    passes = collections.Counter()

    def make_pairs():
        passes["started"] += 1
        return training_pairs(log, tokenizer, short_len=model_cfg.max_short, long_len=model_cfg.max_long, stats=stats)

    batches = shuffled_batches(make_pairs, train_cfg.batch_size, max(args.shuffle_buffer, 2 * train_cfg.batch_size), rng)
    start = time.monotonic()
    ema_loss, step = None, 0
    with tqdm(total=round(args.time_budget), unit="s", desc="pretrain", mininterval=1.0, bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}") as bar:
        while (elapsed := time.monotonic() - start) < args.time_budget:
            batch = next(batches)
            ctx = build_context_batch([c for c, _, _ in batch], tokenizer, model_cfg).to(device)
            targets = torch.from_numpy(tokenizer.codes_for([item for _, item, _ in batch])).to(device)
            value = train_step(model, optimizer, StepBatch(ctx, targets), weights=weights).gen
            step += 1
            ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
            bar.set_postfix(loss=f"{ema_loss:.3f}", step=step, pairs=stats["pairs"])
            bar.update(min(elapsed, args.time_budget) - bar.n)
        bar.update(args.time_budget - bar.n)

    manifest = {"kind": "pretrain", "step": step, "version": 0, "loss_ema": ema_loss,
                "time_budget_s": args.time_budget, "passes_started": passes["started"],
                "stats": dict(stats), "tokenizer_fit": report.as_dict(),
                "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(train_cfg)}
    folder = CheckpointStore(args.out).save(step, {"model": model.state_dict(), "tokenizer": tokenizer.to_tensors()},
                                            manifest)
    print(f"trained {step} steps on {stats['pairs']} pairs in {args.time_budget:.0f}s, loss {ema_loss:.3f}; "
          f"rows {stats['rows']}: skipped {stats['skipped_not_watched']} not watched, "
          f"{stats['skipped_item_not_in_catalogue']} not in the catalogue")
    print(f"checkpoint: {folder}")

    # top-k for the users with the most activity in the log, from their history after the week
    model.eval()
    if args.show_users <= 0:
        return 0
    users = [int(u) for u, _ in collections.Counter(log.user_id.tolist()).most_common(args.show_users)]
    history = kuairand.UserHistory(short_len=model_cfg.max_short, long_len=model_cfg.max_long)
    for i in range(len(log)):
        if log.play_time_ms[i] > 0 and int(log.user_id[i]) in users:
            history.record(int(log.user_id[i]), int(log.video_id[i]), log.duration_ms[i] / 1000.0,
                           log.play_time_ms[i] / 1000.0, kuairand.flags_of(log, i))
    ctx = build_context_batch([history.context(u) for u in users], tokenizer, model_cfg)
    top_k = min(args.top_k, len(tokenizer))
    recs = beam_search(model, ctx, tokenizer.trie(), beam_width=max(args.beam_width, top_k), top_k=top_k)
    for row, user in enumerate(users):
        items = ", ".join(f"{int(i)} ({float(lp):.2f})" for i, lp in zip(recs.item_ids[row], recs.logprobs[row]))
        print(f"user {user}: top-{top_k} item (logprob): {items}")
    return 0
