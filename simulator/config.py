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

    def __post_init__(self) -> None:
        if self.relevance_window < 1:
            raise ValueError(f"simulator.relevance_window must be >= 1, got {self.relevance_window}")
        if self.short_len < 1 or self.long_len < 0:
            raise ValueError("simulator.short_len must be >= 1 and simulator.long_len >= 0")
