"""Figure 8 on our stream: the gradient norm of the RL term on negative samples, GBPO vs ECPO vs the plain ratio.

Invariant: the three objectives are measured on the same batches, at the same weights, through the
same forward; only GBPO (the learner's configured objective) is ever applied. The plain ratio
objective -A * pi / pi_old (no bound, no clip) is measured, never trained on.

Samples are the KuaiRand-Pure log (shipped with the repo) turned into the join's samples in time
order: the context is the user's behaviour before the request, q the percentile rank of the play
time among the user's own earlier plays of the same duration bucket (sec. 3.1.1, beta 2), a
negative is an explicit dislike (`is_hate`). Every other request is marked `onerec`, with pi_old the
item's probability under the policy as it was at the last publish (`--publish-every` steps earlier,
the version a replica would have served); the rest are `legacy` (pi_old = sg(pi), ratio 1: the case
the report's Figure 8 and eqs. 15-16 are about). The tiny policy trains through the log with
GBPO + L_Gen (`--passes`); on every step of the last pass whose batch holds a dislike, the gradient
norm over all parameters of sum_{A<0} rl_row / G (eq. 11's 1/G, G = the batch) is taken for each
objective at token and item level. Timings are irrelevant here; the numbers do not depend on speed.

    python bench/rl_grad.py                       # whole shipped log, 2 passes, ~5 min on 2 cores
    python bench/rl_grad.py --limit 30000 --passes 1 --plot /tmp/rl_grad.png

Prints ONE JSON object: `grad_norm_negatives.<objective>.p50/.p99` at the configured level
(`train.rl_level`, token), `by_level.<level>.<objective>`, the measured step count, the probability
and ratio of the negatives, the q tie share and the share of positives, and `targets`.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.learning import PolicyLearner  # noqa: E402
from learner.config import ModelConfig, TrainConfig  # noqa: E402
from learner.losses import LEVELS, OBJECTIVES, rl_rows  # noqa: E402
from learner.step import autocast_for, token_logprobs, train_step  # noqa: E402
from learner.tokenizer import SemanticTokenizer  # noqa: E402
from simulator import kuairand  # noqa: E402
from streaming.reward import duration_bucket, engagement_score  # noqa: E402


def log_samples(log, tokenizer, model_cfg, *, beta: float = 2.0, history_len: int = 200) -> list[dict]:
    """The log's exposures as the join's samples, in time order (see the module docstring)."""
    history = kuairand.UserHistory(short_len=model_cfg.max_short, long_len=model_cfg.max_long)
    plays_by_bucket: dict = collections.defaultdict(lambda: collections.deque(maxlen=history_len))
    samples = []
    for n, rows in enumerate(kuairand.group_requests(log)):
        user = int(log.user_id[rows[0]])
        context = history.context(user)
        for i in rows.tolist():
            item, dur, play = int(log.video_id[i]), log.duration_ms[i] / 1000.0, log.play_time_ms[i] / 1000.0
            past = plays_by_bucket[(user, int(duration_bucket(dur, beta)))]
            q = float(engagement_score(np.array(past, dtype=np.float64), play))
            past.append(play)
            codes, known = tokenizer.lookup([item])
            if known[0]:
                samples.append({"request_id": f"r{n}", "user_id": user, "item_id": item, "model_version": 0,
                                "source": "onerec" if n % 2 == 0 else "legacy", "context": context,
                                "semantic_id": codes[0].tolist(), "logprob": None, "q": q,
                                "feedback": {"play_time_s": play, "dislike": bool(log.is_hate[i])}})
        for i in rows.tolist():
            if log.play_time_ms[i] > 0:
                history.record(user, int(log.video_id[i]), log.duration_ms[i] / 1000.0,
                               log.play_time_ms[i] / 1000.0, kuairand.flags_of(log, i))
    return samples


def negative_grad_norms(side: PolicyLearner, batch) -> tuple[dict, dict]:
    """{level: {objective: ||d(sum_{A<0} rl_row / G)/d theta||}} at the current weights, one forward."""
    params = [p for p in side.model.parameters() if p.requires_grad]
    neg = batch.adv < 0
    with autocast_for(batch.target.device):
        picked = token_logprobs(side.model, batch.ctx, batch.target)                  # (B, 3)
    norms: dict = {level: {} for level in LEVELS}
    for level in LEVELS:
        for objective in OBJECTIVES:
            loss = rl_rows(objective, picked[neg], batch.logp_old[neg], batch.adv[neg], level=level,
                           eps=side.weights.ecpo_eps, delta=side.weights.ecpo_delta).sum() / len(batch.adv)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norms[level][objective] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    lp = picked.detach()[neg]
    old = batch.logp_old[neg]
    seen = {"token_p": torch.exp(lp).flatten().tolist(), "item_logpi": lp.sum(-1).tolist(),
            "log_ratio": (lp.sum(-1) - old)[~torch.isnan(old)].tolist()}
    return norms, seen


def percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    log = kuairand.read_log(limit=args.limit)
    model_cfg = kuairand.fit_profile(ModelConfig.from_name("tiny"))
    item_ids, emb = kuairand.item_embeddings(log)
    tokenizer = SemanticTokenizer()
    k = model_cfg.codebook_size
    tokenizer.fit(item_ids, emb, codebook_sizes=(k, k, k), seed=args.seed)
    samples = log_samples(log, tokenizer, model_cfg)
    train_cfg = TrainConfig(algorithm="gbpo", batch_size=args.batch_size, tau_window=args.tau_window)
    side = PolicyLearner(model_cfg, train_cfg, tokenizer)
    serving = copy.deepcopy(side.model)
    series = {level: {o: [] for o in OBJECTIVES} for level in LEVELS}
    seen_all: dict = collections.defaultdict(list)
    counts = collections.Counter()
    start = time.monotonic()
    step = 0
    for p in range(args.passes):
        for lo in range(0, len(samples) - args.batch_size + 1, args.batch_size):
            if step % args.publish_every == 0:
                serving.load_state_dict(side.model.state_dict())
            chunk = samples[lo:lo + args.batch_size]
            batch = side._batch(chunk)                      # A against the rolling tau_B window
            onerec = torch.tensor([s["source"] == "onerec" for s in chunk])
            with torch.no_grad(), autocast_for(batch.target.device):
                logged = token_logprobs(serving, batch.ctx, batch.target).float().sum(-1)   # (B,)
            batch.logp_old = torch.where(onerec, logged, torch.full_like(logged, float("nan")))
            counts["positives"] += int((batch.adv > 0).sum())
            counts["rows"] += len(chunk)
            counts["q_is_1"] += sum(s["q"] >= 1.0 for s in chunk)
            if p == args.passes - 1 and bool((batch.adv < 0).any()):
                norms, seen = negative_grad_norms(side, batch)
                for level in LEVELS:
                    for objective in OBJECTIVES:
                        series[level][objective].append(norms[level][objective])
                for key, values in seen.items():
                    seen_all[key].extend(values)
            for group in side.optimizer.param_groups:
                group["lr"] = train_cfg.lr_at(step, model_cfg.name)
            result = train_step(side.model, side.optimizer, batch, weights=side.weights)
            counts["nonfinite_steps"] += not result.finite
            step += 1
    if not series["token"]["gbpo"]:
        raise SystemExit("rl_grad: no batch of the last pass held a dislike; use a longer --limit")
    level = train_cfg.rl_level
    by_level = {lv: {o: percentiles(v) for o, v in series[lv].items()} for lv in LEVELS}
    out = {
        "grad_norm_negatives": by_level[level], "level": level, "by_level": by_level,
        "measured_steps": len(series[level]["gbpo"]), "steps": step, "samples": len(samples),
        "negatives": int(sum(s["feedback"]["dislike"] for s in samples)),
        "negatives_token_p": percentiles(seen_all["token_p"]),
        "negatives_item_log_pi": percentiles(seen_all["item_logpi"]),
        "negatives_onerec_log_ratio_pi_over_pi_old": percentiles(seen_all["log_ratio"]) if seen_all["log_ratio"] else None,
        "q_equal_1_share": counts["q_is_1"] / counts["rows"], "positive_share": counts["positives"] / counts["rows"],
        "nonfinite_steps": counts["nonfinite_steps"],
        "settings": {"limit": args.limit, "passes": args.passes, "batch_size": args.batch_size,
                     "publish_every": args.publish_every, "tau_window": args.tau_window, "model": "tiny",
                     "lr": train_cfg.base_lr(model_cfg.name), "warmup_steps": train_cfg.warmup_steps},
        "wall_s": round(time.monotonic() - start, 1),
    }
    g = by_level[level]
    out["targets"] = {"gbpo_p99_le_ecpo_p99": g["gbpo"]["p99"] <= g["ecpo"]["p99"],
                      "gbpo_p99_lt_plain_ratio_p99": g["gbpo"]["p99"] < g["plain_ratio"]["p99"]}
    if args.plot:
        plot(series, args.plot)
        out["plot"] = str(args.plot)
    return out


def plot(series: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), sharey=True)
    for ax, (level, by_objective) in zip(np.atleast_1d(axes), series.items()):
        for objective, values in by_objective.items():
            ax.plot(values, label=objective, lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{level} level: RL gradient norm on negatives")
        ax.set_xlabel("learner step with a dislike (last pass)")
        ax.legend()
    axes_list = np.atleast_1d(axes)
    axes_list[0].set_ylabel("||grad||")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="log rows (default: the whole shipped log)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--publish-every", type=int, default=20)
    parser.add_argument("--tau-window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="runs/bench/rl_grad.png")
    args = parser.parse_args()
    if args.passes < 1 or args.batch_size < 1 or args.publish_every < 1:
        raise SystemExit("--passes, --batch-size and --publish-every must be >= 1")
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
