"""`onerec eval replay`: prequential evaluation on a KuaiRand log (score each request, then train on it).

Invariant: every request is scored by the model as it was before the request's block, and only then
trained on; the most-popular baseline sees the same blocks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from learner import metrics
from learner.beam import beam_search
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.step import StepBatch, train_step
from learner.tokenizer import SemanticTokenizer
from offline.trainers import GEN_STEP


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

    model_cfg = kuairand.fit_profile(model_cfg)
    torch.manual_seed(seed)
    item_ids, emb = kuairand.item_embeddings(log.slice(0, 0))
    tokenizer = SemanticTokenizer()
    size = model_cfg.codebook_size
    tokenizer.fit(item_ids, emb, codebook_sizes=(size, size, size), seed=seed)
    model = LazyDecoder(model_cfg).to(device)
    state = _Prequential(log, model_cfg, item_ids, k=k, beta=beta)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    requests = kuairand.group_requests(log, gap_s=gap_s)
    curve: list[dict] = []
    every = max(1, len(requests) // curve_points)
    next_point = every
    trained = 0
    bar = tqdm(total=len(requests), desc="replay", unit="req", disable=None, file=sys.stderr)
    for start in range(0, len(requests), train_every):
        block = requests[start: start + train_every]
        contexts, shown, pairs = state.observe(block)
        model.eval()
        recs = beam_search(model, build_context_batch(contexts, tokenizer, model_cfg).to(device), tokenizer.trie(),
                           beam_width=beam_width, top_k=k).item_ids.cpu().numpy()       # (R, k)
        state.score(recs, shown)
        state.count_positives(pairs)
        if pairs:
            model.train()
            for b in range(0, len(pairs), batch_size):
                chunk = pairs[b: b + batch_size]
                ctx = build_context_batch([c for c, _ in chunk], tokenizer, model_cfg).to(device)
                targets = torch.from_numpy(tokenizer.codes_for([v for _, v in chunk])).to(device)
                train_step(model, opt, StepBatch(ctx, targets), weights=GEN_STEP)
            trained += len(pairs)
        done = start + len(block)
        bar.update(len(block))
        if done >= next_point or done == len(requests):
            curve.append({"requests": done, "time_ms": int(log.time_ms[block[-1][-1]]), "trained_pairs": trained,
                          **state.curve_point()})
            next_point += every
    bar.close()
    return {"final": state.final(), "curve": curve,
            "info": {"requests": len(requests), "rows": len(log), "trained_pairs": trained, "k": k,
                     "beam_width": beam_width, "train_every": train_every, "gap_s": gap_s, "device": device,
                     "preset": model_cfg.name}}


class _Prequential:
    """What the replay knows so far: user histories, play times per (user, bucket), popularity, and the
    running scores of the model and the most-popular baseline."""

    def __init__(self, log, model_cfg: ModelConfig, item_ids: np.ndarray, *, k: int, beta: float):
        from simulator import kuairand

        self.log, self.k, self.beta = log, k, beta
        self.item_ids = item_ids
        self.history = kuairand.UserHistory(short_len=model_cfg.max_short, long_len=model_cfg.max_long,
                                            warm_start=True)
        self.flags_of = kuairand.flags_of
        self.plays: dict[tuple[int, int], list[float]] = {}
        self.popularity = np.zeros(len(item_ids))
        self.item_row = {int(v): i for i, v in enumerate(item_ids)}
        self.known = np.isin(log.video_id, item_ids)
        self.totals = {name: {"recall_sum": 0.0, "recall_n": 0, "q_sum": 0.0, "q_n": 0, "shown_n": 0, "rec_n": 0}
                       for name in ("model", "popular")}
        self.window_start = {name: (0.0, 0) for name in self.totals}  # recall sums at the previous curve point

    def observe(self, block: list[np.ndarray]) -> tuple[list[dict], list[dict], list[tuple[dict, int]]]:
        """Contexts before each request, each request's outcomes {item: (q, positive)}, training pairs."""
        from streaming.reward import duration_bucket, engagement_score

        log = self.log
        contexts, shown, pairs = [], [], []
        for rows in block:
            user = int(log.user_id[rows[0]])
            ctx = self.history.context(user)
            contexts.append(ctx)
            outcome: dict[int, tuple[float, bool]] = {}
            for i in rows.tolist():
                if not self.known[i]:
                    continue
                item, duration = int(log.video_id[i]), log.duration_ms[i] / 1000.0
                play = log.play_time_ms[i] / 1000.0
                key = (user, int(duration_bucket(duration, self.beta)))
                q = float(engagement_score(self.plays.get(key, []), play))
                positive = bool(log.long_view[i]) and not bool(log.is_hate[i])
                outcome[item] = (q, positive or outcome.get(item, (0, False))[1])
                if positive:
                    pairs.append((ctx, item))
                self.plays.setdefault(key, []).append(play)
                self.history.record(user, item, duration, play, self.flags_of(log, i))
            shown.append(outcome)
        return contexts, shown, pairs

    def score(self, recs: np.ndarray, shown: list[dict]) -> None:
        popular = self.item_ids[np.argsort(-self.popularity, kind="stable")[:self.k]]
        for ranked_row, outcome in zip(recs, shown):
            for name, ranked in (("model", ranked_row), ("popular", popular)):
                t = self.totals[name]
                relevant = {v for v, (_, pos) in outcome.items() if pos}
                if relevant:
                    t["recall_sum"] += metrics.recall_at_k(ranked[None, :], [relevant], self.k)
                    t["recall_n"] += 1
                hits = [outcome[int(v)][0] for v in ranked if int(v) in outcome]
                t["q_sum"] += sum(hits)
                t["q_n"] += len(hits)
                t["rec_n"] += len(ranked)

    def count_positives(self, pairs: list[tuple[dict, int]]) -> None:
        for _ctx, item in pairs:
            self.popularity[self.item_row[item]] += 1

    def curve_point(self) -> dict:
        point, k = {}, self.k
        for name, t in self.totals.items():
            point[f"{name}_recall@{k}"] = t["recall_sum"] / max(t["recall_n"], 1)
            point[f"{name}_mean_q"] = t["q_sum"] / t["q_n"] if t["q_n"] else None
            prev = self.window_start[name]
            point[f"{name}_recall@{k}_window"] = ((t["recall_sum"] - prev[0]) / (t["recall_n"] - prev[1])
                                                 if t["recall_n"] > prev[1] else None)
            self.window_start[name] = (t["recall_sum"], t["recall_n"])
        return point

    def final(self) -> dict:
        return {name: {f"recall@{self.k}": t["recall_sum"] / max(t["recall_n"], 1),
                       "mean_q": t["q_sum"] / t["q_n"] if t["q_n"] else None,
                       "shown_share": t["q_n"] / max(t["rec_n"], 1), "scored_requests": t["recall_n"]}
                for name, t in self.totals.items()}


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
