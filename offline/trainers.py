"""The offline trainers of `onerec eval sequences`: the lazy decoder, SASRec and most-popular, on one split.

Invariant: both learned models train for the same wall-clock budget through the same loop
(`timed_training`), are scored on the validation item of up to VALIDATION_USERS users
VALIDATION_CHECKS times and keep their best weights (model selection on validation, as in the SASRec
and TIGER protocols); the lazy decoder's step is `learner.step.train_step`, the one training step.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from learner import metrics
from learner.baselines import SASRec
from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.step import StepBatch, StepWeights, train_step
from learner.tokenizer import SemanticTokenizer
from offline.sequences import KS, LeaveOneOut, sequence_context

VALIDATION_CHECKS = 10   # validation scorings per training run (model selection on the validation item)
VALIDATION_USERS = 1000  # users scored at each check
SASREC_NEGATIVES = 512  # shared uniform negatives per SASRec step (sampled softmax; full softmax is ~10x dearer)
GEN_STEP = StepWeights(algorithm="sft", grad_clip=1.0)   # L_Gen only (eq. 10)


def lr_at(progress: float, base_lr: float, *, warmup: float = 0.03, decay_from: float = 0.7) -> float:
    """Warmup-stable-decay: linear warmup, constant, then a cosine down to 10 % over the last 30 %.

    A budget cut short still trained most of the time at the full rate (a plain cosine halves the mean
    rate, which on short budgets learned visibly less)."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.05)
    if progress < decay_from:
        return base_lr
    t = min(1.0, (progress - decay_from) / (1.0 - decay_from))
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def timed_training(step_fn, *, time_budget_s: float, desc: str, max_steps: int | None = None,
                    model: nn.Module | None = None, validate=None, n_checks: int = VALIDATION_CHECKS) -> int:
    """Call step_fn(progress in [0, 1]) -> loss until the time budget (or max_steps) is spent; tqdm shows it.

    With `validate` (() -> score on the validation targets), the model is scored `n_checks` times
    along the way and at the end, and left with the best-scoring weights (model selection on the
    validation item, never on the test item; the checks count against the time budget). A `model`
    trains in train mode and is left in eval mode.
    """
    if model is not None:
        model.train()
    start = time.monotonic()
    steps = 0
    best_score, best_state = -1.0, None
    next_check = 1.0 / n_checks

    def check() -> None:
        nonlocal best_score, best_state
        model.eval()
        score = validate()
        model.train()
        if score > best_score:
            best_score, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}

    bar = tqdm(total=round(time_budget_s, 1), desc=desc, unit="s", disable=None, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}")
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= time_budget_s or (max_steps is not None and steps >= max_steps):
            break
        # progress drives the lr schedule: whichever limit comes first ends it (deterministic under max_steps)
        progress = elapsed / time_budget_s if max_steps is None else max(elapsed / time_budget_s, steps / max_steps)
        loss = step_fn(min(progress, 1.0))
        steps += 1
        if validate is not None and progress >= next_check:
            check()
            next_check += 1.0 / n_checks
        bar.n = min(time.monotonic() - start, time_budget_s)
        bar.set_postfix_str(f"step {steps} loss {loss:.3f}" + (f" best valid {best_score:.4f}" if best_state else ""))
    bar.close()
    if validate is not None:
        check()
        model.load_state_dict(best_state)
    if model is not None:
        model.eval()
    return steps


def train_lazy_decoder(split: LeaveOneOut, tokenizer: SemanticTokenizer, cfg: ModelConfig, *,
                       time_budget_s: float, lr: float, batch_size: int, device: str, beam_width: int,
                       seed: int = 0, max_steps: int | None = None) -> tuple[LazyDecoder, int]:
    """Next-item generation (L_Gen, eq. 10) on every (prefix, next item) of the training sequences."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    examples = np.asarray([(u, t) for u, seq in enumerate(split.train) for t in range(1, len(seq))],
                          dtype=np.int64).reshape(-1, 2)
    if len(examples) == 0:
        raise ValueError("sequences: no training pairs (every user needs >= 4 items to train on)")
    model = LazyDecoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = rng.permutation(len(examples))
    cursor = [0]

    def step(fraction: float) -> float:
        if cursor[0] + batch_size > len(order):
            order[:] = rng.permutation(len(examples))
            cursor[0] = 0
        batch = examples[order[cursor[0]: cursor[0] + batch_size]]
        cursor[0] += batch_size
        contexts = [sequence_context(split.train[u][:t], cfg) for u, t in batch]
        targets = torch.from_numpy(tokenizer.codes_for([split.train[u][t] for u, t in batch])).to(device)
        ctx = build_context_batch(contexts, tokenizer, cfg).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(fraction, lr)
        return train_step(model, opt, StepBatch(ctx, targets), weights=GEN_STEP).gen

    val_users = rng.permutation(len(split.users))[:VALIDATION_USERS]

    def validate() -> float:
        ranked = recommend_lazy(model, tokenizer, [split.train[u] for u in val_users], cfg,
                                beam_width=beam_width, top_k=max(KS))
        return metrics.recall_at_k(ranked, split.valid_target[val_users], max(KS))

    steps = timed_training(step, time_budget_s=time_budget_s, desc="lazy decoder", max_steps=max_steps,
                            model=model, validate=validate)
    return model, steps


def recommend_lazy(model: LazyDecoder, tokenizer: SemanticTokenizer, histories: list[list[int]],
                   cfg: ModelConfig, *, beam_width: int, top_k: int, batch_size: int = 256) -> np.ndarray:
    """(U, top_k) item ids by beam search over the semantic-id trie (all items)."""
    trie = tokenizer.trie()
    out = np.full((len(histories), top_k), -1, dtype=np.int64)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(histories), batch_size), desc="beam search", disable=None, file=sys.stderr,
                      leave=False):
        contexts = [sequence_context(h, cfg) for h in histories[start: start + batch_size]]
        recs = beam_search(model, build_context_batch(contexts, tokenizer, cfg).to(device), trie,
                           beam_width=beam_width, top_k=top_k)
        out[start: start + len(contexts)] = recs.item_ids.cpu().numpy()
    return out


def _left_pad(seqs: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[i, length - len(s):] = torch.as_tensor(s)
    return out


def train_sasrec(split: LeaveOneOut, item_index: dict[int, int], *, time_budget_s: float, lr: float,
                 batch_size: int, device: str, seed: int = 0, max_steps: int | None = None) -> tuple[SASRec, int]:
    """Next-item loss at every position of the training sequences: sampled softmax over the positive and
    SASREC_NEGATIVES shared uniform negatives (the original SASRec used one negative with BCE; more
    negatives with softmax is the stronger, commonly used variant)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    n_items = len(item_index)
    model = SASRec(n_items).to(device)
    seqs = [[item_index[v] + 1 for v in s] for s in split.train if len(s) >= 2]
    if not seqs:
        raise ValueError("sequences: no training pairs for SASRec")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    seqs.sort(key=len)  # batches of neighbours in length order pad little (most sequences are short)

    def step(fraction: float) -> float:
        first = int(rng.integers(0, max(1, len(seqs) - batch_size + 1)))
        chosen = []
        for s in seqs[first: first + batch_size]:
            if len(s) > model.max_len + 1:  # a random window of a long sequence
                begin = int(rng.integers(0, len(s) - model.max_len))
                s = s[begin: begin + model.max_len + 1]
            chosen.append(s)
        batch = _left_pad(chosen, max(len(s) for s in chosen)).to(device)   # (B, L + 1)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(fraction, lr)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):
            hidden = model(inputs)[(targets > 0) & (inputs > 0)]      # (n, d): padding costs nothing
            positive = targets[(targets > 0) & (inputs > 0)]          # (n,) item indices 1..N
            negatives = torch.randint(1, n_items + 1, (SASREC_NEGATIVES,), device=device)
            emb = model.item_emb.weight
            pos_logit = (hidden * emb[positive]).sum(-1, keepdim=True)            # (n, 1)
            neg_logit = hidden @ emb[negatives].T                                # (n, S)
            neg_logit = neg_logit.masked_fill(negatives[None, :] == positive[:, None], float("-inf"))
            logits = torch.cat([pos_logit, neg_logit], dim=1).float()
        # sampled softmax over the positive and S shared uniform negatives (the positive is class 0)
        loss = nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    val_users = rng.permutation(len(split.users))[:VALIDATION_USERS]
    index_items = np.array(sorted(item_index, key=item_index.get), dtype=np.int64)  # row -> item id

    def validate() -> float:
        ranked = recommend_sasrec(model, index_items, item_index, [split.train[u] for u in val_users], top_k=max(KS))
        return metrics.recall_at_k(ranked, split.valid_target[val_users], max(KS))

    steps = timed_training(step, time_budget_s=time_budget_s, desc="sasrec", max_steps=max_steps,
                            model=model, validate=validate)
    return model, steps


def recommend_sasrec(model: SASRec, item_ids: np.ndarray, item_index: dict[int, int],
                     histories: list[list[int]], *, top_k: int, batch_size: int = 512) -> np.ndarray:
    device = next(model.parameters()).device
    out = np.zeros((len(histories), top_k), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(histories), batch_size):
            chunk = [[item_index[v] + 1 for v in h if v in item_index] for h in histories[start: start + batch_size]]
            length = min(model.max_len, max(1, max(len(c) for c in chunk)))
            logits = model.logits(model(_left_pad(chunk, length).to(device))[:, -1]).float()   # (B, N)
            out[start: start + len(chunk)] = item_ids[logits.topk(top_k, dim=1).indices.cpu().numpy()]
    return out


def recommend_popular(train: list[list[int]], n_users: int, *, top_k: int) -> np.ndarray:
    items, counts = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in train if s]),
                              return_counts=True)
    top = items[np.argsort(-counts, kind="stable")[:top_k]]
    return np.tile(top, (n_users, 1))
