"""LoopConfig: the `[loop]` section - replicas, publish cadence, checkpoints, serving, Ray.

Invariant: every value is validated in `__post_init__` (idempotent; `onerec.config` builds the section
once from the merged defaults, file and overrides), and a bad value raises ValueError naming
`loop.<field>`. The bridge's own knobs (host, port, token, timeout, request caps) are `[serve]`
(serving_bridge/config.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoopConfig:
    n_replicas: int = 2                    # two: a replica can die without losing a request
    replicas_per_arm: int = 1              # A/B runs: replicas of each learned arm (2 cores: keep it cheap)
    publish_every_steps: int = 5           # learner steps between weight pushes ...
    publish_every_s: float = 2.0           # ... or seconds, whichever comes first (freshness < 10 s)
    checkpoint_dir: str = "runs/checkpoints"   # fsspec URL: a local path or s3://bucket/prefix
    checkpoint_every_steps: int = 20
    checkpoints_kept: int = 3              # older checkpoint folders are deleted
    versions_kept: int = 4                 # published versions kept in the object store (rollback targets)
    drift_monitor: bool = True             # `onerec run` starts the drift monitor (actors/drift.py)
    init_from: str = "runs/pretrain"       # start weights (+ tokenizer) from here if a checkpoint exists
    beam_width: int = 32                   # candidates per request; the k shown are drawn from them
    top_k: int = 4                         # items per recommendation request
    explore_temperature: float = 1.0       # 0 = greedy top-k; 1 = sample the k from pi over the beam
                                           # (exposures ~ pi_old, as GBPO assumes; greedy collapses)
    duration_s: float = 0.0                # `onerec run` length; 0 = until Ctrl-C
    micro_batch: int = 32                  # online learner step size in samples (train.batch_size is offline)
    max_batch_wait_s: float = 0.5          # train on a partial micro-batch after this long
    consumer_group: str = "onerec-learner"
    ray_address: str | None = None         # None: local Ray; "auto" or "ray://host:10001": a cluster
    learner_num_gpus: float = 0.0          # >0 puts the learner on a GPU (bf16 autocast)
    replica_num_gpus: float = 0.0
    actor_num_cpus: float = 0.5            # logical CPUs per actor; small so the loop fits 2 cores
    embedded_feedback_window_s: float = 2.0  # `onerec run` on the embedded broker: simulated users answer
                                           # at once, so the join closes windows after 2 s, not 30 s
    join_worker: bool = True               # `onerec run` starts `onerec worker`; false when cluster nodes run theirs
    progress_every_s: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints = ("n_replicas", "replicas_per_arm", "publish_every_steps", "checkpoint_every_steps", "checkpoints_kept", "versions_kept",
                         "beam_width", "top_k", "micro_batch")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"loop.{name} must be an integer >= 1, got {value!r}")
        positive_floats = ("publish_every_s", "max_batch_wait_s", "actor_num_cpus",
                           "progress_every_s", "embedded_feedback_window_s")
        for name in positive_floats:
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"loop.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("duration_s", "learner_num_gpus", "replica_num_gpus", "explore_temperature"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"loop.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.top_k > self.beam_width:
            raise ValueError(f"loop.top_k ({self.top_k}) must be <= loop.beam_width ({self.beam_width})")
        if not self.checkpoint_dir:
            raise ValueError("loop.checkpoint_dir must not be empty")
        if self.ray_address == "":
            self.ray_address = None


@dataclass
class DriftConfig:
    """The `[drift]` section: thresholds of the drift monitor (actors/drift.py) and what an alert does."""

    log_path: str = "runs/drift.jsonl"
    kl_threshold: float = 8.0          # nats, mean over probe users, top-20 with eps 1e-4 (ceiling ln(1e4) = 9.2).
                                       # Calibrated on `onerec run`: consecutive healthy versions (2 s apart)
                                       # score 4.5-6.8; scrambled output heads score 9.1
    dislike_threshold: float = 0.05    # the KuaiRand log's dislike rate is 0.0007
    min_served: int = 50               # served records with fewer samples raise no dislike alert
    served_window: int = 500           # samples per served record (per model version)
    positive_q: float = 0.75           # q above this and no dislike = positive (top quartile, sec. 3.1.1)
    rollback: bool = False             # roll serving back on an alert
    # Collapse (the policy narrows onto a few items): over a served window of `served_window` samples,
    # distinct items per exposure below this share, or exposure Gini over the catalogue above
    # `collapse_gini` (500 samples spread perfectly over 7.5k items still have Gini 0.93), for
    # `collapse_versions` windows in a row. Set before any A/B arm ran; issue 15 calibrates them.
    collapse_distinct_share: float = 0.2
    collapse_gini: float = 0.995
    collapse_versions: int = 3
    # PROVISIONAL thresholds (issue 15 item 1), set by reasoning, not by measurement: bench/drift.py
    # (issue 15 item 2) measures each signal's separation on forced faults and sets them.
    kl_level1_threshold: float = 2.0   # nats, exact KL of the s1 distribution (ceiling ln(codebook))
    kl_k1_prev_threshold: float = 2.0  # nats, k1 estimate of KL(pi_old || pi_new) vs the previous version
    kl_k1_ref_threshold: float = 4.0   # nats, the same vs the oldest kept accepted version
    # k3 assumes x ~ pi_old exactly (E[r] = 1); served items are drawn from the beam, so E[r] is the new
    # policy's beam mass over the old one's: a healthy 1-minute `onerec run`-like loop (tests/test_prometheus.py)
    # read k3 = 13 -> 211 while k1 stayed in [-1.2, -0.6]. So k3 is recorded and exported, and alerts
    # only where a threshold is set.
    kl_k3_prev_threshold: float = float("inf")
    kl_k3_ref_threshold: float = float("inf")
    kl_samples: int = 256              # served samples kept per version for the k1 / k3 estimates
    kl_min_samples: int = 32           # a version with fewer buffered samples is not compared with
    kl_batch: int = 64                 # contexts per forward when scoring them
    entropy_min: float = 0.05          # nats: any level's mean probe entropy below this alerts
    coverage_min: float = 0.002        # served coverage of the catalogue, collapse_versions windows in a row
    top_n: int = 10                    # the N most served items of a window ...
    top_share_max: float = 0.9         # ... holding more than this share of the requests' top items
    cold_start_max: float = 0.9        # share of exposures never trained on ...
    cold_start_after: int = 2000       # ... checked once this many samples were seen (a fresh run starts cold)
    probe_top_k: int = 20
    probe_beam_width: int = 20
    kl_eps: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("min_served", "served_window", "probe_top_k", "probe_beam_width", "collapse_versions",
                     "kl_samples", "kl_min_samples", "kl_batch", "top_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"drift.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.probe_top_k > self.probe_beam_width:
            raise ValueError("drift.probe_top_k must be <= drift.probe_beam_width")
        if not 0 < self.kl_eps < 1:
            raise ValueError(f"drift.kl_eps must be in (0, 1), got {self.kl_eps}")
        for name in ("kl_level1_threshold", "kl_k1_prev_threshold", "kl_k1_ref_threshold", "kl_k3_prev_threshold",
                     "kl_k3_ref_threshold", "entropy_min"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"drift.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("coverage_min", "top_share_max", "cold_start_max", "collapse_distinct_share"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"drift.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if int(self.cold_start_after) < 0:
            raise ValueError(f"drift.cold_start_after must be >= 0, got {self.cold_start_after!r}")
        if self.kl_min_samples > self.kl_samples:
            raise ValueError("drift.kl_min_samples must be <= drift.kl_samples")
