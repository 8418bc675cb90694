"""App Stay Time and its companions per arm, and the report math of an A/B run.

Invariant: App Stay Time is total play time per user per simulated day (the report's primary metric,
OneRec-V2 section 3.1.3), averaged over the users of an arm with every enrolled user counted, including
days they never came; intervals are percentile bootstraps over users (users are the unit of the split).

The functions below take plain arrays, so the online run's records can be scored with them too:
    bootstrap_ci(values) -> (lo, hi);  relative_diff(arm_values, ref_values) -> {"diff": "+x.xxx%", ...}
    coverage(counts, catalogue_size);  exposure_gini(counts, catalogue_size)
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from learner.metrics import gini

DAY_S = 86400.0


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per user)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def format_pct(x: float) -> str:
    """The report's format: +0.227%."""
    return f"{100.0 * x:+.3f}%"


def relative_diff(arm_values, ref_values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """mean(arm) / mean(ref) - 1 with a bootstrap interval (users resampled within each arm)."""
    a, b = np.asarray(arm_values, np.float64), np.asarray(ref_values, np.float64)
    if len(a) == 0 or len(b) == 0 or b.mean() == 0:
        return {"diff": "nan", "value": math.nan, "lo": math.nan, "hi": math.nan, "lo_pct": "nan", "hi_pct": "nan"}
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(axis=1)
    mb = b[rng.integers(0, len(b), (n_boot, len(b)))].mean(axis=1)
    ratio = ma / np.where(mb == 0, np.nan, mb) - 1.0
    q = (1.0 - level) / 2.0
    lo, hi = float(np.nanquantile(ratio, q)), float(np.nanquantile(ratio, 1.0 - q))
    value = float(a.mean() / b.mean() - 1.0)
    return {"diff": format_pct(value), "value": value, "lo": lo, "hi": hi,
            "lo_pct": format_pct(lo), "hi_pct": format_pct(hi)}


def coverage(counts: dict | Counter, catalogue_size: int) -> float:
    """Share of the catalogue served at least once."""
    return sum(1 for c in counts.values() if c > 0) / max(int(catalogue_size), 1)


def exposure_gini(counts: dict | Counter, catalogue_size: int) -> float:
    """Gini of the exposure counts over the whole catalogue (unserved videos count as zeros)."""
    x = np.zeros(max(int(catalogue_size), len(counts)))
    x[:len(counts)] = list(counts.values())
    return gini(x)


@dataclass
class _ArmBook:
    users: dict = field(default_factory=dict)     # user -> [play_s, videos, likes, dislikes, sessions]
    served: Counter = field(default_factory=Counter)
    cold_served: int = 0


class StayTimeLedger:
    """Accumulates what each arm's users watched; `report` turns it into the A/B table (JSON-ready)."""

    def __init__(self, catalogue_size: int, cold_items=(), day_s: float = DAY_S):
        self.catalogue_size = int(catalogue_size)
        self.cold_items = {int(v) for v in cold_items}
        self.day_s = float(day_s)
        self._arms: dict[str, _ArmBook] = {}
        self.max_t = 0.0

    def _book(self, arm: str) -> _ArmBook:
        return self._arms.setdefault(arm, _ArmBook())

    def enroll(self, arm: str, user_id: int) -> None:
        """Count the user in the arm's denominator even if they never watch anything."""
        self._book(arm).users.setdefault(int(user_id), [0.0, 0, 0, 0, 0])

    def record(self, arm: str, user_id: int, sim_t: float, responses: list[dict], items, *,
               new_session: bool = False) -> None:
        if len(responses) != len(items):
            raise ValueError(f"{len(responses)} responses for {len(items)} items")
        book = self._book(arm)
        row = book.users.setdefault(int(user_id), [0.0, 0, 0, 0, 0])
        row[0] += sum(float(r["play_time_s"]) for r in responses)
        row[1] += len(responses)
        row[2] += sum(bool(r.get("like")) for r in responses)
        row[3] += sum(bool(r.get("dislike")) for r in responses)
        row[4] += int(bool(new_session))
        for v in items:
            book.served[int(v)] += 1
            book.cold_served += int(v) in self.cold_items
        self.max_t = max(self.max_t, float(sim_t))

    def per_user_day(self, arm: str, days: float) -> np.ndarray:
        """(users,) stay time in seconds per simulated day, one value per enrolled user."""
        book = self._arms[arm]
        return np.array([r[0] for r in book.users.values()], dtype=np.float64) / days

    def report(self, *, days: float | None = None, reference: str | None = None, oracle_arm: str = "oracle",
               n_boot: int = 1000, seed: int = 0) -> dict:
        if not self._arms:
            raise ValueError("the ledger holds no records")
        if reference is not None and reference not in self._arms:
            raise ValueError(f"reference arm {reference!r} has no records (arms: {sorted(self._arms)})")
        days = float(days) if days else max(self.max_t / self.day_s, 1e-9)
        arms = {}
        for name, book in self._arms.items():
            stay = self.per_user_day(name, days)
            totals = np.array(list(book.users.values()), dtype=np.float64).reshape(-1, 5)
            videos, sessions = totals[:, 1].sum(), totals[:, 4].sum()
            served = sum(book.served.values())
            arms[name] = {
                "users": len(book.users), "user_days": len(book.users) * days,
                "stay_time": float(stay.mean()), "stay_time_ci": list(bootstrap_ci(stay, n_boot, seed)),
                "sessions_per_user_day": float(sessions / (len(book.users) * days)),
                "videos_per_session": float(videos / sessions) if sessions else 0.0,
                "videos": int(videos), "play_time_s": float(totals[:, 0].sum() / max(videos, 1)),
                "like_rate": float(totals[:, 2].sum() / max(videos, 1)),
                "dislike_rate": float(totals[:, 3].sum() / max(videos, 1)),
                "coverage": coverage(book.served, self.catalogue_size),
                "gini": exposure_gini(book.served, self.catalogue_size),
                "cold_start_share": book.cold_served / max(served, 1)}
        if oracle_arm in arms and arms[oracle_arm]["stay_time"] > 0:
            for a in arms.values():
                a["oracle_share"] = a["stay_time"] / arms[oracle_arm]["stay_time"]
        diffs = {}
        if reference is not None:
            ref = self.per_user_day(reference, days)
            diffs = {name: relative_diff(self.per_user_day(name, days), ref, n_boot, seed)
                     for name in arms if name != reference}
        return {"days": days, "reference": reference, "arms": arms, "diff_vs_reference": diffs}
