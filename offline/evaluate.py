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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from learner import metrics
from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.tokenizer import SemanticTokenizer

KS = (5, 10)
VALIDATION_CHECKS = 10   # validation scorings per training run (model selection on the validation item)
VALIDATION_USERS = 1000  # users scored at each check
SASREC_NEGATIVES = 512  # shared uniform negatives per SASRec step (sampled softmax; full softmax is ~10x dearer)
COOC_WINDOW = 3
EMBED_DIM = 32


# ----------------------------------------------------------------------------------- the split
def read_sequences(path: str | Path) -> dict[int, list[int]]:
    """`user_id item_id item_id ...` per line (whitespace separated, time order) -> {user: items}.

    A user on two lines has the second line appended. Bad tokens raise ValueError naming the line.
    """
    seqs: dict[int, list[int]] = {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = [int(p) for p in parts]
            except ValueError:
                raise ValueError(f"{path}: line {n}: expected integer ids, got {line.strip()[:80]!r}") from None
            if min(values) < 0:
                raise ValueError(f"{path}: line {n}: ids must be >= 0")
            seqs.setdefault(values[0], []).extend(values[1:])
    if not seqs:
        raise ValueError(f"{path}: no sequences")
    return seqs


@dataclass
class LeaveOneOut:
    """Per user: training items (all but the last two), the validation target and the test target."""

    users: np.ndarray                 # (U,)
    train: list[list[int]]            # item ids, time order
    valid_target: np.ndarray          # (U,)
    test_target: np.ndarray           # (U,)

    def test_history(self, u: int) -> list[int]:
        return self.train[u] + [int(self.valid_target[u])]

    def train_items(self) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in self.train if s]))


def leave_one_out(seqs: dict[int, list[int]], *, min_len: int = 3) -> LeaveOneOut:
    """Split users with at least `min_len` items (others are dropped: no training item to condition on)."""
    users = sorted(u for u, s in seqs.items() if len(s) >= min_len)
    if not users:
        raise ValueError(f"sequences: no user has >= {min_len} items")
    return LeaveOneOut(
        users=np.asarray(users, dtype=np.int64),
        train=[list(seqs[u][:-2]) for u in users],
        valid_target=np.asarray([seqs[u][-2] for u in users], dtype=np.int64),
        test_target=np.asarray([seqs[u][-1] for u in users], dtype=np.int64))


def cooccurrence_embeddings(train: list[list[int]], item_ids: np.ndarray, *, dim: int = EMBED_DIM,
                            window: int = COOC_WINDOW, seed: int = 0) -> np.ndarray:
    """(N, dim) unit rows: truncated SVD of the positive PMI of items co-occurring within `window`
    positions of a training sequence. Items never co-occurring get a small random vector (they still
    need a semantic id; the random part spreads them over the codebooks)."""
    n = len(item_ids)
    index = {int(v): i for i, v in enumerate(item_ids)}
    rows, cols = [], []
    for seq in train:
        idx = np.asarray([index[v] for v in seq], dtype=np.int64)
        for k in range(1, window + 1):
            a, b = idx[:-k], idx[k:]
            keep = a != b
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
    rng = np.random.default_rng(seed)
    emb = rng.normal(scale=1e-3, size=(n, dim)).astype(np.float32)
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
        key, counts = np.unique(r * n + c, return_counts=True)
        r, c = key // n, key % n
        marg = np.bincount(r, weights=counts, minlength=n)
        pmi = np.log(counts * counts.sum() / (marg[r] * marg[c]))
        keep = pmi > 0
        if keep.any():
            mat = torch.sparse_coo_tensor(np.stack([r[keep], c[keep]]), pmi[keep].astype(np.float32),
                                          (n, n), check_invariants=True).coalesce()
            q = min(dim, n - 1)
            torch.manual_seed(seed)
            u, s, _ = torch.svd_lowrank(mat, q=q, niter=4)
            emb[:, :q] += (u * s.sqrt()).numpy()
    return emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-8)


def codebook_sizes_for(n_items: int, cfg: ModelConfig) -> tuple[int, int, int]:
    """About sqrt(N) codes per level (capped by the model's codebook): level 1 groups, level 2 splits,
    level 3 resolves the rest; K^3 >> N keeps collisions rare."""
    k = int(min(cfg.codebook_size, max(4, math.ceil(math.sqrt(n_items)))))
    return (k, k, k)


def sequence_context(history: list[int], cfg: ModelConfig) -> dict:
    """Previous items as the user context: the newest `max_short` short, up to `max_long` before them
    long, zero durations / play times / flags, an all-zero profile (sequence files have no features)."""
    short = history[-cfg.max_short:]
    long = history[max(0, len(history) - cfg.max_short - cfg.max_long): max(0, len(history) - cfg.max_short)]

    def part(items: list[int]) -> dict:
        z = [0.0] * len(items)
        return {"item_id": [int(v) for v in items], "duration_s": z, "play_time_s": list(z), "flags": [0] * len(items)}

    return {"profile": [0] * cfg.profile_fields, "short": part(short), "long": part(long)}


def scores(ranked: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    out = {}
    for k in KS:
        out[f"recall@{k}"] = metrics.recall_at_k(ranked, targets, k)
        out[f"ndcg@{k}"] = metrics.ndcg_at_k(ranked, targets, k)
    return {key: out[key] for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")}


# ----------------------------------------------------------------------------------- training
def _gen_step(model, opt, ctx, targets: torch.Tensor, device: str) -> float:
    """One L_Gen (eq. 10) step with gradient clipping; bf16 autocast on a GPU. Returns the loss."""
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=torch.device(device).type == "cuda"):
        loss = model.loss(ctx, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _lr_at(progress: float, base_lr: float, *, warmup: float = 0.03, decay_from: float = 0.7) -> float:
    """Warmup-stable-decay: linear warmup, constant, then a cosine down to 10 % over the last 30 %.

    A budget cut short still trained most of the time at the full rate (a plain cosine halves the mean
    rate, which on short budgets learned visibly less)."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.05)
    if progress < decay_from:
        return base_lr
    t = min(1.0, (progress - decay_from) / (1.0 - decay_from))
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _timed_training(step_fn, *, time_budget_s: float, desc: str, max_steps: int | None = None,
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
            group["lr"] = _lr_at(fraction, lr)
        return _gen_step(model, opt, ctx, targets, device)

    val_users = rng.permutation(len(split.users))[:VALIDATION_USERS]

    def validate() -> float:
        ranked = recommend_lazy(model, tokenizer, [split.train[u] for u in val_users], cfg,
                                beam_width=beam_width, top_k=max(KS))
        return metrics.recall_at_k(ranked, split.valid_target[val_users], max(KS))

    steps = _timed_training(step, time_budget_s=time_budget_s, desc="lazy decoder", max_steps=max_steps,
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


class SASRec(nn.Module):
    """SASRec-style baseline (Kang & McAuley 2018): causal self-attention over item-id embeddings with
    learned positions; the next item is scored by a dot product with the shared item embeddings."""

    def __init__(self, n_items: int, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                 max_len: int = 50, dropout: float = 0.2):
        super().__init__()
        self.max_len = max_len
        self.item_emb = nn.Embedding(n_items + 1, d_model, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=d_model * 2, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.item_emb.weight, std=0.02)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) item indices (0 = padding, left-padded) -> hidden states (B, L, d)."""
        length = seq.shape[1]
        pos = torch.arange(self.max_len - length, self.max_len, device=seq.device)  # the newest item sits last
        h = self.drop(self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)
        return self.norm(self.encoder(h, mask=causal))         # (B, L, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., N) scores of items 1..N (shared item embeddings)."""
        return hidden @ self.item_emb.weight[1:].T


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
            group["lr"] = _lr_at(fraction, lr)
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

    steps = _timed_training(step, time_budget_s=time_budget_s, desc="sasrec", max_steps=max_steps,
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
def eval_replay(log, model_cfg: ModelConfig, *, k: int, beam_width: int, train_every: int, batch_size: int,
                lr: float, device: str, gap_s: float = 60.0, beta: float = 2.0, seed: int = 0,
                curve_points: int = 100) -> dict:
    """Prequential evaluation (issue 5, part 2): requests in time order, each scored first, then trained on.

    - Requests: `kuairand.group_requests(log, gap_s)`; a request's context is the user's history
      (pre-week KuaiRand history, then every earlier row of the log) just before it.
    - Score: the model's top-k by beam search; Recall@k of the request's positives (rows the user
      watched long, `long_view`, and did not dislike); and the duration-aware q (report sec. 3.1.1,
      `streaming.reward`) of the recommended items the user was actually shown, q being the play time's
      percentile among the user's earlier play times in the same duration bucket.
    - Then train: L_Gen (eq. 10) on the positives with the context they were served with. Scoring and
      training go in blocks of `train_every` requests: every request of a block is scored by the model
      as it was before the block (contexts are still taken request by request).
    - Baseline: the most popular positives so far (same blocks).
    - Item embeddings for the tokenizer use only the pre-week histories and content (no co-occurrence
      from the week being replayed).
    Returns {"final": {"model": {...}, "popular": {...}}, "curve": [...], "info": {...}}.
    """
    from simulator import kuairand
    from streaming.reward import duration_bucket, engagement_score

    if (model_cfg.profile_fields, model_cfg.profile_vocab) != (kuairand.PROFILE_FIELDS, kuairand.PROFILE_VOCAB):
        model_cfg = model_cfg.replace(profile_fields=kuairand.PROFILE_FIELDS, profile_vocab=kuairand.PROFILE_VOCAB)
    torch.manual_seed(seed)
    item_ids, emb = kuairand.item_embeddings(log.slice(0, 0))
    tokenizer = SemanticTokenizer()
    size = model_cfg.codebook_size
    tokenizer.fit(item_ids, emb, codebook_sizes=(size, size, size), seed=seed)
    trie = tokenizer.trie()
    model = LazyDecoder(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    history = kuairand.UserHistory(short_len=model_cfg.max_short, long_len=model_cfg.max_long, warm_start=True)
    plays: dict[tuple[int, int], list[float]] = {}
    popularity = np.zeros(len(item_ids))
    item_row = {int(v): i for i, v in enumerate(item_ids)}
    known = np.isin(log.video_id, item_ids)
    requests = kuairand.group_requests(log, gap_s=gap_s)
    totals = {name: {"recall_sum": 0.0, "recall_n": 0, "q_sum": 0.0, "q_n": 0, "shown_n": 0, "rec_n": 0}
              for name in ("model", "popular")}
    curve: list[dict] = []
    window_start = {name: (0.0, 0) for name in totals}  # recall sums at the previous curve point
    every = max(1, len(requests) // curve_points)
    next_point = every
    trained = 0
    bar = tqdm(total=len(requests), desc="replay", unit="req", disable=None, file=sys.stderr)
    for start in range(0, len(requests), train_every):
        block = requests[start: start + train_every]
        contexts, shown, pairs = [], [], []
        for rows in block:
            user = int(log.user_id[rows[0]])
            ctx = history.context(user)
            contexts.append(ctx)
            outcome = {}  # item -> (q, positive)
            for i in rows.tolist():
                if not known[i]:
                    continue
                item, duration = int(log.video_id[i]), log.duration_ms[i] / 1000.0
                play = log.play_time_ms[i] / 1000.0
                key = (user, int(duration_bucket(duration, beta)))
                q = float(engagement_score(plays.get(key, []), play))
                positive = bool(log.long_view[i]) and not bool(log.is_hate[i])
                outcome[item] = (q, positive or outcome.get(item, (0, False))[1])
                if positive:
                    pairs.append((ctx, item))
                plays.setdefault(key, []).append(play)
                history.record(user, item, duration, play, kuairand.flags_of(log, i))
            shown.append(outcome)
        model.eval()
        recs = beam_search(model, build_context_batch(contexts, tokenizer, model_cfg).to(device), trie,
                           beam_width=beam_width, top_k=k).item_ids.cpu().numpy()       # (R, k)
        popular = item_ids[np.argsort(-popularity, kind="stable")[:k]]
        for ranked_row, outcome in zip(recs, shown):
            for name, ranked in (("model", ranked_row), ("popular", popular)):
                t = totals[name]
                relevant = {v for v, (_, pos) in outcome.items() if pos}
                if relevant:
                    t["recall_sum"] += metrics.recall_at_k(ranked[None, :], [relevant], k)
                    t["recall_n"] += 1
                hits = [outcome[int(v)][0] for v in ranked if int(v) in outcome]
                t["q_sum"] += sum(hits)
                t["q_n"] += len(hits)
                t["rec_n"] += len(ranked)
        for _ctx, item in pairs:
            popularity[item_row[item]] += 1
        if pairs:
            model.train()
            for b in range(0, len(pairs), batch_size):
                chunk = pairs[b: b + batch_size]
                ctx = build_context_batch([c for c, _ in chunk], tokenizer, model_cfg).to(device)
                targets = torch.from_numpy(tokenizer.codes_for([v for _, v in chunk])).to(device)
                _gen_step(model, opt, ctx, targets, device)
            trained += len(pairs)
        done = start + len(block)
        bar.update(len(block))
        if done >= next_point or done == len(requests):
            point = {"requests": done, "time_ms": int(log.time_ms[block[-1][-1]]), "trained_pairs": trained}
            for name, t in totals.items():
                point[f"{name}_recall@{k}"] = t["recall_sum"] / max(t["recall_n"], 1)
                point[f"{name}_mean_q"] = t["q_sum"] / t["q_n"] if t["q_n"] else None
                prev = window_start[name]
                point[f"{name}_recall@{k}_window"] = ((t["recall_sum"] - prev[0]) / (t["recall_n"] - prev[1])
                                                     if t["recall_n"] > prev[1] else None)
                window_start[name] = (t["recall_sum"], t["recall_n"])
            curve.append(point)
            next_point += every
    bar.close()
    final = {name: {f"recall@{k}": t["recall_sum"] / max(t["recall_n"], 1),
                    "mean_q": t["q_sum"] / t["q_n"] if t["q_n"] else None,
                    "shown_share": t["q_n"] / max(t["rec_n"], 1), "scored_requests": t["recall_n"]}
             for name, t in totals.items()}
    return {"final": final, "curve": curve,
            "info": {"requests": len(requests), "rows": len(log), "trained_pairs": trained, "k": k,
                     "beam_width": beam_width, "train_every": train_every, "gap_s": gap_s, "device": device,
                     "preset": model_cfg.name}}


def plot_replay(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["info"]["k"]
    x = [p["requests"] for p in result["curve"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("model", "popular"):
        line, = axes[0].plot(x, [p[f"{name}_recall@{k}"] for p in result["curve"]], label=f"{name} (cumulative)")
        axes[0].plot(x, [np.nan if p[f"{name}_recall@{k}_window"] is None else p[f"{name}_recall@{k}_window"]
                         for p in result["curve"]], color=line.get_color(), alpha=0.35, label=f"{name} (window)")
        axes[1].plot(x, [np.nan if p[f"{name}_mean_q"] is None else p[f"{name}_mean_q"] for p in result["curve"]],
                     label=name)
    axes[0].set_title(f"Recall@{k} of long, not disliked views")
    axes[1].set_title("mean q of recommended items the user was shown")
    for ax in axes:
        ax.set_xlabel("requests (time order)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- data makers
def synthetic_sequences(n_users: int, n_items: int, *, length: tuple[int, int] = (6, 20), follow: float = 0.8,
                        seed: int = 0) -> dict[int, list[int]]:
    """Sequences with a learnable pattern: each item has one fixed successor (a random permutation),
    followed with probability `follow`; otherwise the next item is drawn from a Zipf-like popularity
    (so most-popular is a fair but beatable baseline)."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    seqs = {}
    for u in range(n_users):
        n = int(rng.integers(length[0], length[1] + 1))
        items = [int(rng.choice(n_items, p=popularity))]
        for _ in range(n - 1):
            items.append(int(successor[items[-1]]) if rng.random() < follow else int(rng.choice(n_items, p=popularity)))
        seqs[u] = [i + 1 for i in items]  # ids from 1, as in the SASRec files
    return seqs


def kuairand_sequences(*, min_len: int = 5, long_view_only: bool = False) -> dict[int, list[int]]:
    """Per user, the KuaiRand week's watched videos in time order (optionally only long views),
    consecutive repeats removed; users with fewer than `min_len` items dropped."""
    from simulator import kuairand

    log = kuairand.read_log()
    keep = log.long_view == 1 if long_view_only else np.ones(len(log), dtype=bool)
    seqs: dict[int, list[int]] = {}
    for u, v in zip(log.user_id[keep].tolist(), log.video_id[keep].tolist()):
        s = seqs.setdefault(u, [])
        if not s or s[-1] != v:
            s.append(v)
    return {u: s for u, s in seqs.items() if len(s) >= min_len}


def write_sequences(seqs: dict[int, list[int]], path: str | Path) -> None:
    with open(path, "w") as f:
        for u, items in seqs.items():
            f.write(" ".join(str(x) for x in [u, *items]) + "\n")


# ----------------------------------------------------------------------------------- CLI
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
