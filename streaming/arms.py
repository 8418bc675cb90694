"""A/B arms: which arm a user is in. One function, used by the bridge (routing), the traffic and the reports.

Invariant: the arm of a user is a pure function of (user id, the ordered arm list, the salt): stable
across processes and restarts, every int64 id maps to exactly one arm, and arms are balanced (a
64-bit hash of the id, reduced modulo the number of arms).
"""
from __future__ import annotations

from collections.abc import Sequence

import xxhash


def arm_of(user_id: int, arms: Sequence[str], *, salt: str = "onerec-ab") -> str:
    """The arm of `user_id` among `arms` (order matters: it is part of the experiment's definition)."""
    if not arms:
        raise ValueError("arm_of: no arms")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arm_of: arm names must be distinct, got {list(arms)}")
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise ValueError(f"arm_of: user_id must be an int, got {type(user_id).__name__}")
    digest = xxhash.xxh3_64_intdigest(f"{salt}\x00{user_id}".encode())
    return arms[digest % len(arms)]
