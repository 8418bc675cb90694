"""The World: KuaiRand-fitted users who watch, like, get bored, leave and come back; and its oracle.

Invariant: a user's state changes only in `respond` (history, taste drift, patience); `expected`,
`oracle_top_k` and `context` read it and never change it. Taste is the fitted vector p_u, moved only
toward videos the user watched long (rate `world_drift_rate`), never defined by what was just shown.

API (plain Python / numpy; no broker, no Ray):

    world = World.load(path=None, cfg=SimulatorConfig())     # None = data/simulator/kuairand_world.*
    world.item_ids (N,) int64, world.users (U,) int64, world.duration_of(item_id) -> float
    world.context(user_id) -> dict                 # docs/interfaces.md user context (profile, short, long)
    world.respond(user_id, item_ids, now_s) -> [{"play_time_s", "like", "dislike", "follow", "comment",
                                                 "forward", "collect"}, ...]   # one per shown item, in order
    world.expected(user_id, item_ids) -> {"play_time_s", "p_like", "p_dislike", "p_long_view"}  (arrays)
    world.oracle_top_k(user_id, k) -> [item_id, ...]  # argmax of expected play time over the videos the
                                                      # user has not watched recently (a repeat only costs)
    world.sessions: SessionBook;  world.population(user_ids, seed) -> Population (the traffic schedule)
    world.is_cold(item_id): the video had no play in the fit days

A user id the world does not know is a ValueError naming it; so is an unknown item id.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from learner.flags import flags_of, is_long_view
from simulator import kuairand
from simulator.config import SimulatorConfig
from simulator.response import HEADS, ResponseModel, sigmoid
from simulator.sessions import Population, SessionBook

_RECENT = 200   # videos a user remembers having watched (a repeat within them costs patience)


@dataclass
class UserState:
    vec: np.ndarray          # (D,) taste, drifting
    bias: np.ndarray         # (H,) own appeal per head (fixed)
    recent: deque            # item rows, newest last (at most _RECENT)
    recent_count: Counter    # item row -> occurrences in `recent`


class World:
    def __init__(self, model: ResponseModel, cfg: SimulatorConfig | None = None, seed: int | None = None):
        self.cfg = cfg or SimulatorConfig()
        self.model = model
        self.rng = np.random.default_rng(self.cfg.seed if seed is None else seed)
        self.item_ids = model.item_ids.astype(np.int64)
        self.users = model.user_ids.astype(np.int64)
        self._item_row = {int(v): n for n, v in enumerate(self.item_ids)}
        self._user_row = {int(u): n for n, u in enumerate(self.users)}
        self._durations = model.item_duration_s
        self._state: dict[int, UserState] = {}
        norms = np.linalg.norm(model.user_vec, axis=1)
        self._prior_norm = float(norms[norms > 0].mean()) if (norms > 0).any() else 1.0
        self._item_unit = model.item_vec / (np.linalg.norm(model.item_vec, axis=1, keepdims=True) + 1e-12)
        self._history = kuairand.UserHistory(short_len=self.cfg.short_len, long_len=self.cfg.long_len,
                                             warm_start=True)
        self.sessions = SessionBook(self.cfg, model.item_embedding, float(model.scalars["crowd_distance"]))

    @classmethod
    def load(cls, path: str | Path | None = None, cfg: SimulatorConfig | None = None,
             seed: int | None = None) -> "World":
        cfg = cfg or SimulatorConfig()
        return cls(ResponseModel.load(path or cfg.world_path or None), cfg, seed)

    def population(self, user_ids=None, seed: int = 0, start_s: float = 0.0) -> Population:
        ids = self.users if user_ids is None else user_ids
        for u in ids:
            self._row_of_user(int(u))
        return Population(self.sessions, ids, self.cfg, seed=seed, start_s=start_s)

    # ---- lookups -----------------------------------------------------------------------------------
    def _row_of_user(self, user_id: int) -> int:
        row = self._user_row.get(int(user_id))
        if row is None:
            raise ValueError(f"user_id {user_id} is not a user of the world")
        return row

    def _rows_of_items(self, item_ids) -> np.ndarray:
        rows = []
        for v in item_ids:
            row = self._item_row.get(int(v))
            if row is None:
                raise ValueError(f"item_id {v} is not in the world's catalogue")
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def duration_of(self, item_id: int) -> float:
        return float(self._durations[self._rows_of_items([item_id])[0]])

    def is_cold(self, item_id: int) -> bool:
        return bool(self.model.item_fit_play_s[self._rows_of_items([item_id])[0]] <= 0)

    def state(self, user_id: int) -> UserState:
        user_id = int(user_id)
        st = self._state.get(user_id)
        if st is None:
            row = self._row_of_user(user_id)
            warm = kuairand.read_user_history().get(user_id, {}).get("watch_seq", [])
            recent = deque((self._item_row[v] for v in warm if v in self._item_row), maxlen=_RECENT)
            st = self._state[user_id] = UserState(vec=self.model.user_vec[row].copy(),
                                                  bias=self.model.user_bias[row].copy(),
                                                  recent=recent, recent_count=Counter(recent))
        return st

    def context(self, user_id: int) -> dict:
        """docs/interfaces.md's user context: warm-start history plus what the user watched in the run."""
        self._row_of_user(user_id)
        return self._history.context(int(user_id))

    # ---- scoring without changing state -----------------------------------------------------------
    def _scores(self, st: UserState, rows: np.ndarray) -> np.ndarray:
        scores = self.model.head_scores(st.vec, st.bias, rows)                          # (M, H)
        shift = float(self.model.scalars.get("repeat_shift", 0.0))
        if shift:
            seen = np.fromiter((st.recent_count.get(int(r), 0) > 0 for r in rows), bool, len(rows))
            scores[seen, 0] -= shift
        return scores

    def expected(self, user_id: int, item_ids) -> dict[str, np.ndarray]:
        st = self.state(user_id)
        rows = self._rows_of_items(item_ids)
        return self._expected_rows(st, rows)

    def _expected_rows(self, st: UserState, rows: np.ndarray) -> dict[str, np.ndarray]:
        scores = self._scores(st, rows)
        return {"play_time_s": self.model.expected_play_s(scores[:, 0], rows),
                "p_like": sigmoid(scores[:, HEADS.index("like")]),
                "p_dislike": sigmoid(scores[:, HEADS.index("dislike")]),
                "p_long_view": self.model.p_long_view(scores[:, 0], rows)}

    def expected_all(self, user_id: int) -> np.ndarray:
        """(N,) expected play time of every catalogue video for the user now (catalogue order)."""
        st = self.state(user_id)
        rows = np.arange(len(self.item_ids))
        s_play = self.model.play_scores(st.vec, st.bias)
        shift = float(self.model.scalars.get("repeat_shift", 0.0))
        if shift and st.recent_count:
            s_play[np.fromiter(st.recent_count, np.int64)] -= shift
        return self.model.expected_play_s(s_play, rows)

    def oracle_top_k(self, user_id: int, k: int) -> list[int]:
        """The k videos of highest expected play time the user has not watched recently, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        play = self.expected_all(user_id)
        st = self.state(user_id)
        if st.recent_count:
            play[np.fromiter(st.recent_count, np.int64)] = -np.inf
        top = np.argpartition(-play, k - 1)[:k] if k < len(play) else np.arange(len(play))
        top = top[np.argsort(-play[top], kind="stable")]
        return [int(self.item_ids[r]) for r in top]

    # ---- the one state change -----------------------------------------------------------------------
    def respond(self, user_id: int, item_ids, now_s: float) -> list[dict]:
        """The user watches the page in order; history, taste drift and patience are updated."""
        user_id = int(user_id)
        st = self.state(user_id)
        rows = self._rows_of_items(item_ids)
        if len(rows) == 0:
            return []
        if self.sessions.session(user_id) is None:
            self.sessions.start(user_id, float(now_s))
        draws = self.model.sample(self._scores(st, rows), rows, self.rng)
        out = []
        for j, row in enumerate(rows.tolist()):
            r = {"play_time_s": float(draws["play_time_s"][j]), "like": bool(draws["like"][j]),
                 "dislike": bool(draws["dislike"][j]), "follow": bool(draws["follow"][j]),
                 "comment": bool(draws["comment"][j]), "forward": bool(draws["forward"][j]), "collect": False}
            duration = float(self._durations[row])
            repeat = st.recent_count.get(row, 0) > 0
            self.sessions.observe(user_id, row, r["play_time_s"], duration, dislike=r["dislike"], repeat=repeat)
            self._remember(st, row)
            if bool(is_long_view(duration, r["play_time_s"])):
                self._drift(st, row)
            self._history.record(user_id, int(self.item_ids[row]), duration, r["play_time_s"],
                                 flags_of(r, duration))
            out.append(r)
        return out

    def _remember(self, st: UserState, row: int) -> None:
        if len(st.recent) == st.recent.maxlen:
            old = st.recent[0]
            st.recent_count[old] -= 1
            if st.recent_count[old] <= 0:
                del st.recent_count[old]
        st.recent.append(row)
        st.recent_count[row] += 1

    def _drift(self, st: UserState, row: int) -> None:
        """p <- (1 - eta) p + eta |p| q_hat: a small step toward the long-viewed video's taste direction."""
        eta = self.cfg.world_drift_rate
        if eta <= 0:
            return
        norm = float(np.linalg.norm(st.vec)) or self._prior_norm
        st.vec = (1.0 - eta) * st.vec + eta * norm * self._item_unit[row]
