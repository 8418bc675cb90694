"""Users in sessions: patience that runs out, a return gap that shortens with satisfaction, a fast clock.

Invariant: a user is in at most one session at a time, and has exactly one pending event in the
`Population` schedule (their next page, or their return), so simulated time only moves forward per user.

The exit rule follows the KuaiRand-based simulators of the offline-RL literature (KuaiEnv: a user quits
when too many of the recent items are within a distance threshold of each other), as patience:

    patience_0 = world_patience
    per shown video: patience -= fatigue + (1 - satisfaction) + dislike_cost * dislike
                               + repeat_cost * [video in the user's recent history]
                               + crowd_cost * [more than crowd_max of the session's last crowd_window
                                               videos lie within crowd_distance of it]
    satisfaction = min(1, play_time / min(18 s, 0.9 duration))   (1 = KuaiRand's long view)
    the session ends after the page on which patience reaches 0.

After a session the user returns after an exponential gap with mean
    gap_max * (gap_min / gap_max) ** mean_satisfaction_of_the_session
so a session that satisfied returns the user sooner (KuaiSim's retention idea, in its simplest form).
`crowd_distance` is fixed from the catalogue at fit time (5% quantile of random pairs' cosine distance);
the other settings are SimulatorConfig's `world_*` defaults, set before any policy ran.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from learner.flags import LONG_VIEW_S
from simulator.config import SimulatorConfig


def satisfaction(play_time_s: float, duration_s: float) -> float:
    """In [0, 1]: the share of a long view the play reached (a zero-length video satisfies nothing)."""
    if duration_s <= 0:
        return 0.0
    return float(min(1.0, max(0.0, play_time_s) / min(LONG_VIEW_S, 0.9 * duration_s)))


@dataclass
class Session:
    started_s: float
    patience: float
    videos: int = 0
    satisfaction_sum: float = 0.0
    window: deque = field(default_factory=deque)   # item rows of the session's recent videos

    @property
    def mean_satisfaction(self) -> float:
        return self.satisfaction_sum / self.videos if self.videos else 0.0


class SessionBook:
    """Every user's open session; the World calls `observe` per shown video, the Population the rest."""

    def __init__(self, cfg: SimulatorConfig, item_embedding: np.ndarray, crowd_distance: float):
        self.cfg = cfg
        self._emb = item_embedding.astype(np.float32)     # (N, E) unit rows
        self._crowd_sim = 1.0 - float(crowd_distance)     # cosine similarity above which two are "the same"
        self._open: dict[int, Session] = {}

    def start(self, user_id: int, now_s: float) -> Session:
        if user_id in self._open:
            raise ValueError(f"user {user_id} already has an open session")
        s = self._open[user_id] = Session(started_s=now_s, patience=self.cfg.world_patience,
                                          window=deque(maxlen=self.cfg.world_crowd_window))
        return s

    def session(self, user_id: int) -> Session | None:
        return self._open.get(user_id)

    def crowded(self, session: Session, item_row: int) -> bool:
        """More than crowd_max of the session's recent videos within crowd_distance of this one."""
        if len(session.window) <= self.cfg.world_crowd_max:
            return False
        sims = self._emb[list(session.window)] @ self._emb[item_row]
        return int((sims >= self._crowd_sim).sum()) > self.cfg.world_crowd_max

    def observe(self, user_id: int, item_row: int, play_time_s: float, duration_s: float, *,
                dislike: bool, repeat: bool) -> float:
        """One shown video in the user's session (opened at time 0 if none is open): the patience left."""
        s = self._open.get(user_id) or self.start(user_id, 0.0)
        c = self.cfg
        sat = satisfaction(play_time_s, duration_s)
        cost = c.world_fatigue + (1.0 - sat) + c.world_dislike_cost * bool(dislike)
        cost += c.world_repeat_cost * bool(repeat) + c.world_crowd_cost * self.crowded(s, item_row)
        s.patience -= cost
        s.videos += 1
        s.satisfaction_sum += sat
        s.window.append(item_row)
        return s.patience

    def is_over(self, user_id: int) -> bool:
        s = self._open.get(user_id)
        return s is None or s.patience <= 0

    def end(self, user_id: int) -> Session:
        s = self._open.pop(user_id, None)
        if s is None:
            raise ValueError(f"user {user_id} has no open session")
        return s

    def mean_gap_s(self, mean_satisfaction: float) -> float:
        c = self.cfg
        return 3600.0 * c.world_gap_max_h * (c.world_gap_min_h / c.world_gap_max_h) ** float(mean_satisfaction)


class Population:
    """The traffic schedule: who asks for the next page, and when, in simulated seconds.

        t, user = pop.next_request()            # pop.starts_session: whether this page opens a session
        responses = world.respond(user, items, t)
        pop.after_page(user, responses, t)      # True: the user asks again; False: left, return scheduled
    """

    def __init__(self, sessions: SessionBook, user_ids, cfg: SimulatorConfig, seed: int = 0, start_s: float = 0.0):
        users = [int(u) for u in user_ids]
        if not users:
            raise ValueError("Population needs at least one user id")
        self.sessions, self.cfg = sessions, cfg
        self.rng = np.random.default_rng(seed)
        self._seq = 0
        # first arrivals spread over the longest mean gap: the run starts in a steady state, not a burst
        first = start_s + self.rng.uniform(0.0, 3600.0 * cfg.world_gap_max_h, len(users))
        self._heap = [(float(t), n, u) for n, (t, u) in enumerate(zip(first, users))]
        heapq.heapify(self._heap)
        self._seq = len(users)
        self.starts_session = False
        self.sessions_started = 0

    def peek_time(self) -> float:
        return self._heap[0][0]

    def next_request(self) -> tuple[float, int]:
        """(sim_t, user_id) of the earliest pending page; opens the user's session if they are returning."""
        t, _, user = heapq.heappop(self._heap)
        self.starts_session = self.sessions.session(user) is None
        if self.starts_session:
            self.sessions.start(user, t)
            self.sessions_started += 1
        return t, user

    def after_page(self, user_id: int, responses: list[dict], sim_t: float) -> bool:
        """Schedule the user's next event after the page shown at sim_t; True if the session goes on."""
        page_s = sum(float(r["play_time_s"]) for r in responses) + self.cfg.world_page_overhead_s * len(responses)
        if not self.sessions.is_over(user_id):
            self._push(sim_t + page_s, user_id)
            return True
        s = self.sessions.end(user_id)
        gap = self.rng.exponential(self.sessions.mean_gap_s(s.mean_satisfaction))
        self._push(sim_t + page_s + gap, user_id)
        return False

    def _push(self, t: float, user_id: int) -> None:
        heapq.heappush(self._heap, (float(t), self._seq, int(user_id)))
        self._seq += 1


class SimClock:
    """Simulated time running `speedup` times faster than the wall clock, for a paced online run."""

    def __init__(self, speedup: float, sim_start_s: float = 0.0, wall_start: float | None = None):
        if not speedup > 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.speedup, self.sim_start_s = float(speedup), float(sim_start_s)
        self.wall_start = time.monotonic() if wall_start is None else float(wall_start)

    def sim_now(self) -> float:
        return self.sim_start_s + (time.monotonic() - self.wall_start) * self.speedup

    def wall_delay(self, sim_t: float) -> float:
        """Wall seconds until simulated time sim_t (0 if already past)."""
        return max(0.0, (sim_t - self.sim_now()) / self.speedup)
