"""A user's state in the join: the bounded play history q is scored against.

Invariant: a `users` store value is the user's history: rows of three little-endian float64
(duration bucket, play_time_s, ts), sorted by ts, the last `history_len`. Appending and truncating
rows are byte slices; numpy reads them without a copy. (Redelivered requests are dropped by the
join's `closed` markers; the two-stage join also kept request-id hashes here, for redelivered
`joined` records, which no longer exist.)

`score_items` is q of report section 3.1.1 (streaming/reward.py's `engagement_score`) against the
user's plays in the same duration bucket from requests with an earlier ts, and inserts the request's
own plays at their ts (so a request closed after a later one still sees only earlier plays).
"""
from __future__ import annotations

import struct

import numpy as np

from streaming.reward import EMPTY_HISTORY_SCORE, duration_bucket

BUCKET_MEMO_SIZE = 100_000         # duration -> bucket entries kept (video durations repeat)
HISTORY_DTYPE = "<f8"               # a user's history rows: little-endian float64
HISTORY_ROW = 24                    # bytes per row: bucket, play_time_s, ts
_FLOAT64 = struct.Struct("<d")
_COUNT = struct.Struct("<I")


def engagement_q(plays: np.ndarray, play_time: float) -> float:
    """`reward.engagement_score(plays, play_time)` for one play time, without its sort (the join's hot path)."""
    if plays.size == 0:
        return EMPTY_HISTORY_SCORE
    return int(np.count_nonzero(plays <= play_time)) / plays.size


def history_rows(history: bytes) -> np.ndarray:
    """(H, 3) float64 rows [duration bucket, play_time_s, ts] of a user's history bytes, sorted by ts."""
    return np.frombuffer(history, dtype=HISTORY_DTYPE).reshape(-1, 3)


class Buckets:
    """`duration_bucket` of durations, memoized."""

    def __init__(self, beta: float):
        self.beta, self.memo = beta, {}

    def __call__(self, durations: list[float]) -> list[int]:
        memo = self.memo
        if len(memo) > BUCKET_MEMO_SIZE:
            memo.clear()
        missing = [d for d in durations if d not in memo]
        if missing:
            memo.update(zip(missing, duration_bucket(np.asarray(missing, dtype=np.float64), self.beta).tolist()))
        return [memo[d] for d in durations]


def warm_start(durations: list[float], play_times: list[float], *, keep: int, beta: float) -> bytes:
    """A user the join has never seen starts from the (duration, play time) pairs of the served context,
    long then short (oldest first; `fast_schemas.context_plays`), at ts 0 (before every request), the last
    `keep` of them. Returns the history bytes."""
    durations, play_times = durations[-keep:], play_times[-keep:]
    rows = np.zeros((len(durations), 3), dtype=HISTORY_DTYPE)
    rows[:, 0] = duration_bucket(np.asarray(durations, dtype=np.float64), beta)
    rows[:, 1] = play_times
    return rows.tobytes()


def score_items(history: bytes, ts: float, buckets: list[int], play_times: list[float | None]
                ) -> tuple[list[float | None], bytes]:
    """q of each item of one request (None where it has no feedback) against the plays of `history` with
    an earlier ts in the same bucket, and the history with this request's plays inserted at `ts` (after
    the rows of every request with ts <= this one, as a stable sort by ts would). Not truncated."""
    values = np.frombuffer(history, dtype=HISTORY_DTYPE)   # (3 H,) rows bucket, play_time_s, ts
    # requests close in ts order per user, so usually every row is earlier
    in_order = not history or _FLOAT64.unpack_from(history, len(history) - 8)[0] < ts
    earlier = values if in_order else values[:3 * int(values[2::3].searchsorted(ts, side="left"))]
    earlier_bucket, earlier_play = earlier[0::3], earlier[1::3]
    scores, plays = [], []
    for bucket, play_time in zip(buckets, play_times):
        if play_time is None:
            scores.append(None)
            continue
        scores.append(engagement_q(earlier_play[earlier_bucket == bucket], play_time))
        plays += (bucket, play_time, ts)
    if plays:
        new_rows = struct.pack(f"<{len(plays)}d", *plays)
        if in_order:
            history += new_rows
        else:
            at = int(values[2::3].searchsorted(ts, side="right")) * HISTORY_ROW
            history = history[:at] + new_rows + history[at:]
    return scores, history
