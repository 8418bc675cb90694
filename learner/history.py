"""Per-user recent behaviour, and the user context (docs/interfaces.md) that the model reads from it.

Invariant: a context lists the user's items oldest first; `short` holds the newest `short_len`,
`long` the `long_len` before them. Where a user's profile and pre-existing history come from is
the caller's business (`profile_of`, `warm_start`): the embedded world supplies KuaiRand's
(`simulator.kuairand.user_history`), a platform its own.
"""
from __future__ import annotations

from typing import Callable

Row = tuple[int, float, float, int]          # (item_id, duration_s, play_time_s, flags)


class UserHistory:
    """Bounded rows per user; `record` appends in O(1) amortised, `context` builds the interface dict."""

    def __init__(self, *, short_len: int, long_len: int, profile_fields: int,
                 profile_of: Callable[[int], list[int]] | None = None,
                 warm_start: Callable[[int], list[Row]] | None = None):
        if short_len < 1 or long_len < 0:
            raise ValueError(f"short_len must be >= 1 and long_len >= 0, got {short_len}, {long_len}")
        self.short_len, self.long_len = short_len, long_len
        self.profile_fields = profile_fields
        self._profile_of = profile_of
        self._warm_start = warm_start
        self._rows: dict[int, list[Row]] = {}

    def _user(self, user_id: int) -> list[Row]:
        rows = self._rows.get(user_id)
        if rows is None:
            rows = list(self._warm_start(user_id))[-(self.short_len + self.long_len):] if self._warm_start else []
            self._rows[user_id] = rows
        return rows

    def record(self, user_id: int, item_id: int, duration_s: float, play_time_s: float, flags: int = 0) -> None:
        rows = self._user(int(user_id))
        rows.append((int(item_id), float(duration_s), float(play_time_s), int(flags)))
        cap = self.short_len + self.long_len
        if len(rows) > 2 * cap:  # amortised trim keeps appends O(1)
            del rows[: len(rows) - cap]

    def rows(self, user_id: int) -> list[Row]:
        """The user's kept rows, oldest first (a copy)."""
        return list(self._user(int(user_id))[-(self.short_len + self.long_len):])

    def profile(self, user_id: int) -> list[int]:
        if self._profile_of is None:
            return [0] * self.profile_fields
        return list(self._profile_of(int(user_id)))

    def context(self, user_id: int) -> dict:
        rows = self._user(int(user_id))[-(self.short_len + self.long_len):]
        short, long = rows[-self.short_len:], rows[: max(0, len(rows) - self.short_len)]

        def seq(part: list[Row]) -> dict:
            return {"item_id": [r[0] for r in part], "duration_s": [r[1] for r in part],
                    "play_time_s": [r[2] for r in part], "flags": [r[3] for r in part]}

        return {"profile": self.profile(user_id), "short": seq(short), "long": seq(long)}
