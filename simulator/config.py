"""SimulatorConfig: how the KuaiRand-fitted simulated users behave and where their parameters live.

Invariant: an empty `params_path` means the fitted artifact shipped in `data/simulator/`, so
`onerec run` works in a fresh clone without refitting.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimulatorConfig:
    seed: int = 0                           # one seed -> one reproducible stream of responses
    params_path: str = ""                   # "" = data/simulator/kuairand_simulator.safetensors
    # Weight of relevance in the latent play-time score (normal-score units per standard deviation of
    # relevance within a duration bucket). The log itself shows 0.067 (its videos were already picked by
    # Kuaishou's recommender, which narrows the range of relevance and hides most of the effect); 0.3 makes
    # a relevant video's play clearly longer (mean play/duration 0.54 for a user's 10 most relevant videos
    # vs 0.11 for random ones) while the log's play-time law per bucket stays within tolerance.
    # < 0 means "use the value fitted on the log".
    relevance_strength: float = 0.3
    relevance_window: int = 20              # recent history items whose mean embedding defines "close"
    short_len: int = 20                     # per-user context lengths handed to the recommender
    long_len: int = 100
    # Tolerances the fit is checked against (`onerec simulator` and tests/test_simulator.py).
    tol_play_quantile_rel: float = 0.15     # per duration bucket, |sim - log| / log at p25, p50, p75, p90
    tol_play_quantile_abs_s: float = 1.0    # ... or within one second (for quantiles near zero)
    tol_like_rate_rel: float = 0.1          # like rate within 10 % of the log's (measured: 2 %)
    tol_dislike_rate_rel: float = 0.5       # dislikes are rare (79 in the week): within 50 %
    fit_check_rows: int = 100_000           # log rows replayed through the simulator when checking

    # ---- the traffic of the running loop (simulator/traffic.py)
    users: int = 200                        # simulated users drawn from the World (few, so they come back)
    ab_users: int = 700                     # `onerec ab` / bench/ab.py: users over all arms (100 per arm for 7)
    concurrency: int = 4                    # pages in flight; the simulated clock runs as fast as they are served
    ab_concurrency: int = 16                # `onerec ab`: pages in flight over all arms (the bridge batches per arm)
    legacy_share: float = 0.5               # share of pages served by the legacy popularity pipeline and logged
                                            # as source "legacy", as in OneRec's traffic (the same in every arm)

    # ---- the World (simulator/world.py, sessions.py): fixed before any policy runs, never tuned to a policy
    world_path: str = ""                    # "" = data/simulator/kuairand_world.safetensors
    world_dim: int = 16                     # latent taste dimensions of the response model
    world_epochs: int = 3                   # passes over the fit rows (1-3 minutes of CPU)
    world_drift_rate: float = 0.01          # taste moves this share toward a long-viewed video's vector
    # Patience (units of "one fully unsatisfying video"): falls per video by fatigue + (1 - satisfaction),
    # and by the repetition and dislike costs; the session ends when it reaches 0. 8 units at the log's
    # mean satisfaction gives sessions of about a dozen videos.
    world_patience: float = 8.0
    world_fatigue: float = 0.25             # every video costs this much, however good (sessions end)
    world_repeat_cost: float = 2.0          # the same video again within the user's recent history
    world_crowd_cost: float = 1.0           # too many near-identical videos in the recent window
    world_crowd_window: int = 10            # recent videos of the session compared with the new one
    world_crowd_max: int = 3                # "too many": more than this many within the distance threshold
    world_dislike_cost: float = 3.0
    # Return gap after a session: exponential with mean gap_max * (gap_min/gap_max) ** satisfaction.
    world_gap_max_h: float = 8.0            # mean gap after a session that satisfied nothing
    world_gap_min_h: float = 1.0            # mean gap after a fully satisfying session
    world_page_overhead_s: float = 1.0      # swipe time per shown video on the simulated clock
    world_clock_speedup: float = 3600.0     # simulated seconds per wall second in a paced (online) run

    def __post_init__(self) -> None:
        if self.relevance_window < 1:
            raise ValueError(f"simulator.relevance_window must be >= 1, got {self.relevance_window}")
        if self.short_len < 1 or self.long_len < 0:
            raise ValueError("simulator.short_len must be >= 1 and simulator.long_len >= 0")
        for name in ("users", "ab_users", "concurrency", "ab_concurrency"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"simulator.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.legacy_share) <= 1.0:
            raise ValueError(f"simulator.legacy_share must be in [0, 1], got {self.legacy_share!r}")
        for name in ("world_dim", "world_epochs", "world_crowd_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"simulator.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("world_patience", "world_gap_max_h", "world_gap_min_h", "world_clock_speedup"):
            if not getattr(self, name) > 0:
                raise ValueError(f"simulator.{name} must be > 0, got {getattr(self, name)}")
        for name in ("world_fatigue", "world_repeat_cost", "world_crowd_cost", "world_dislike_cost",
                     "world_page_overhead_s", "world_crowd_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"simulator.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.world_drift_rate < 1:
            raise ValueError(f"simulator.world_drift_rate must be in [0, 1), got {self.world_drift_rate}")
        if self.world_gap_min_h > self.world_gap_max_h:
            raise ValueError("simulator.world_gap_min_h must be <= simulator.world_gap_max_h")
