"""The action flags of a user context, and the long-view rule: the one table everything else imports.

Invariant: a flag's bit never changes meaning (contexts logged months ago stay readable); `learner`
embeds the bitmask, `streaming`, `simulator` and `serving_bridge` write it, all from here.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

# docs/interfaces.md: 1 like, 2 follow, 4 comment, 8 forward, 16 collect, 32 dislike, 64 long view
FLAG_BITS: dict[str, int] = {"like": 1, "follow": 2, "comment": 4, "forward": 8, "collect": 16,
                             "dislike": 32, "long_view": 64}
ACTIONS = ("like", "follow", "comment", "forward", "collect")   # optional feedback booleans
LONG_VIEW_S = 18.0   # KuaiRand's long_view: play >= 18 s, or (nearly) the whole of a shorter video


def is_long_view(duration_s: np.ndarray | float, play_time_s: np.ndarray | float) -> np.ndarray:
    """KuaiRand's rule: play >= min(18 s, 0.9 * duration); a zero-length video is never a long view."""
    duration = np.asarray(duration_s, dtype=np.float64)
    return (np.asarray(play_time_s) >= np.minimum(LONG_VIEW_S, 0.9 * duration)) & (duration > 0)


def action_flags(feedback: Mapping) -> int:
    """The bitmask of the booleans in a feedback event or simulated response (no long view)."""
    flags = FLAG_BITS["dislike"] if feedback.get("dislike") else 0
    for name in ACTIONS:
        if feedback.get(name):
            flags |= FLAG_BITS[name]
    return flags


def flags_of(feedback: Mapping, duration_s: float) -> int:
    """Action bits plus the long-view bit from `feedback["play_time_s"]` against the duration."""
    flags = action_flags(feedback)
    if bool(is_long_view(duration_s, feedback["play_time_s"])):
        flags |= FLAG_BITS["long_view"]
    return int(flags)
