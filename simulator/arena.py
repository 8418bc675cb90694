"""An in-process A/B harness: fixed or learned policies as callables, one shared World, one clock.

Invariant: a user belongs to exactly one arm for the whole run (`arm_of`: a stable hash of the id), and
every arm meets the same population, the same settings and the same clock; only the policy differs.

    arm_of(user_id, arms, salt="onerec-ab") -> str     # balanced, stable, total over int ids
    policies = fixed_policies(world, seed)              # {"oracle", "popular", "random"}
    report = run_arena(world, {"oracle": policies["oracle"], ...}, days=3, n_users=600, k=6,
                       reference="random")              # StayTimeLedger.report(...) + timings
A policy is `policy(user_id: int, context: dict, k: int) -> list[int]` (item ids of the catalogue).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from simulator.ledger import DAY_S, StayTimeLedger
from simulator.world import World
from streaming.arms import arm_of  # the one assignment: the online A/B and the arena split users alike

Policy = Callable[[int, dict, int], list]




def fixed_policies(world: World, seed: int = 0) -> dict[str, Policy]:
    """The brackets of every learned policy: the world's oracle, the fitted log's most played, random."""
    rng = np.random.default_rng(seed)
    items = world.item_ids
    by_play = items[np.argsort(-world.model.item_fit_play_s, kind="stable")].tolist()

    def oracle(user_id: int, context: dict, k: int) -> list[int]:
        return world.oracle_top_k(user_id, k)

    def popular(user_id: int, context: dict, k: int) -> list[int]:
        """Most played (total play time) in the fit days, skipping what the context shows as watched."""
        seen = set(context["short"]["item_id"]) | set(context["long"]["item_id"])
        out = []
        for v in by_play:
            if v not in seen:
                out.append(int(v))
                if len(out) == k:
                    break
        return out

    def random(user_id: int, context: dict, k: int) -> list[int]:
        return [int(v) for v in rng.choice(items, size=k, replace=False)]

    return {"oracle": oracle, "popular": popular, "random": random}


def run_arena(world: World, policies: dict[str, Policy], *, days: float, n_users: int, k: int = 6,
              seed: int = 0, salt: str = "onerec-ab", reference: str | None = None,
              user_ids=None, n_boot: int = 1000) -> dict:
    """Run the population for `days` simulated days, each user's pages from their arm's policy."""
    if not policies:
        raise ValueError("run_arena needs at least one policy")
    if reference is not None and reference not in policies:
        raise ValueError(f"reference arm {reference!r} is not among the arms {sorted(policies)}")
    if user_ids is None:
        rng = np.random.default_rng(seed)
        user_ids = rng.choice(world.users, size=min(n_users, len(world.users)), replace=False)
    arms = list(policies)
    arm_by_user = {int(u): arm_of(int(u), arms, salt=salt) for u in user_ids}
    cold = world.item_ids[world.model.item_fit_play_s <= 0]
    ledger = StayTimeLedger(len(world.item_ids), cold_items=cold)
    for u, a in arm_by_user.items():
        ledger.enroll(a, u)
    pop = world.population(list(arm_by_user), seed=seed)
    end_s = days * DAY_S
    t0 = time.perf_counter()
    pages = 0
    policy_s = {a: 0.0 for a in arms}
    while pop.peek_time() < end_s:
        sim_t, user = pop.next_request()
        arm = arm_by_user[user]
        tp = time.perf_counter()
        items = policies[arm](user, world.context(user), k)
        policy_s[arm] += time.perf_counter() - tp
        responses = world.respond(user, items, sim_t)
        ledger.record(arm, user, sim_t, responses, items, new_session=pop.starts_session)
        pop.after_page(user, responses, sim_t)
        pages += 1
    wall = time.perf_counter() - t0
    report = ledger.report(days=days, reference=reference, n_boot=n_boot, seed=seed)
    report.update({"users": len(arm_by_user), "k": k, "pages": pages, "salt": salt, "wall_s": wall,
                   "wall_s_per_sim_day": wall / days, "policy_wall_s": policy_s})
    return report
