"""How fast the simulated users answer: `UserSimulator.respond` one call at a time (what the loop does
per shown item) against `respond_batch` over the same pairs (the baseline: the vectorized path).

Prints ONE JSON object: microseconds per response both ways and their ratio, plus the relevance effect
(mean play / duration for each user's 10 most relevant videos vs 10 random ones), so a change that
makes responding cheaper but flattens the response to relevance shows up here too.

    python bench/user_simulator.py           # ~10 s on one core
"""
from __future__ import annotations

import json
import time

import numpy as np

from simulator.users import UserSimulator


def main() -> None:
    sim = UserSimulator.default(seed=0)
    rng = np.random.default_rng(0)
    users = rng.choice(sim.user_ids, 2000)
    items = rng.choice(sim.item_ids, 2000)
    for u in np.unique(users):          # warm the per-user caches, as a running loop has them
        sim.relevance(int(u), int(items[0]))

    start = time.perf_counter()
    for u, v in zip(users.tolist(), items.tolist()):
        sim.respond(u, v)
    single_us = (time.perf_counter() - start) / len(users) * 1e6

    start = time.perf_counter()
    sim.respond_batch(users, items)
    batch_us = (time.perf_counter() - start) / len(users) * 1e6

    row_of = {int(v): n for n, v in enumerate(sim.item_ids)}
    close, rand = [], []
    for u in users[:200].tolist():
        rel = np.nan_to_num(sim.params.item_embeddings @ (sim._history_mean(u) if sim._history_mean(u) is not None
                                                          else np.zeros(sim.params.item_embeddings.shape[1])))
        for chosen, out in ((sim.item_ids[np.argsort(-rel)[:10]], close), (rng.choice(sim.item_ids, 10), rand)):
            r = sim.respond_batch(np.full(10, u), chosen)
            out.extend(r["play_time_s"] / sim.durations_s[[row_of[int(v)] for v in chosen]])
    print(json.dumps({"respond_us": round(single_us, 1), "respond_batch_us_per_pair": round(batch_us, 1),
                      "single_over_batch": round(single_us / batch_us, 2),
                      "play_ratio_relevant": round(float(np.mean(close)), 3),
                      "play_ratio_random": round(float(np.mean(rand)), 3),
                      "relevance_strength": sim.relevance_coef}))


if __name__ == "__main__":
    main()
