"""Model and training configuration: one table of presets (Table 5 of the report plus `tiny`).

Invariant: a derived field (d_head, d_ff, g_kv, embed_dim) left None is filled from its sources
when the config is constructed, and `__post_init__` validates; both happen once per construction
(`onerec.config` merges preset, file and overrides first, then constructs) and calling it again
changes nothing. `replace` re-derives a field whose value still equals its derivation from the
old sources, so it follows them until the caller gives it a value of their own.

    cfg = ModelConfig.from_name("0.5B")
    cfg = ModelConfig.from_name("tiny", d_model=128)     # overrides before the one construction
    cfg.n_params()              # analytic dense parameter count, without building the model

Table 5 gives d_model, n_layers, n_heads and embed_dim; the rest is ours, chosen so that the
analytic count lands within a few percent of the table's "Parameters" column:
- d_ff (SwiGLU intermediate size) is not in the table; it is set per preset to hit the count.
- embed_dim is read as the per-feature embedding width of a context item (each categorical feature
  of an item - id, three semantic ids, duration, play time, flags, segment, recency - embeds to
  embed_dim, the concatenation is projected to d_context). The table's values are d_model / 20.
- The hashed item-id table is a sparse parameter (as in industrial recommenders) and is not counted
  in the dense parameter count, matching how the report's sizes scale with d_model only.
- codebook_size 8192 per level as in OneRec; d_head = d_model / n_heads, G_kv = n_heads,
  L_kv = S_kv = 1 by default (section 2.3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# number of categorical features per context item (id, s1, s2, s3, duration, play, flags, segment, recency)
N_ITEM_FEATURES = 9
N_FLAG_VALUES = 128      # 7-bit action bitmask of interfaces.md
N_RECENCY_BUCKETS = 16   # log2 of "how many items ago", so 3000-long histories still fit


@dataclass
class ModelConfig:
    name: str = "tiny"
    # decoder
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_head: int | None = None          # derived: d_model // n_heads
    d_ff: int | None = None            # derived: 4 * d_model (SwiGLU intermediate width)
    # lazy cross-attention (eqs. 1-4, 9)
    g_kv: int | None = None            # derived: n_heads (the report's default G_kv = N_head)
    l_kv: int = 1
    s_kv: int = 1
    # semantic ids
    codebook_size: int = 64
    n_levels: int = 3
    # mixture of experts (0 experts = dense)
    n_experts: int = 0
    n_shared_experts: int = 1
    moe_top_k: int = 2
    moe_d_ff: int = 0
    first_dense_layers: int = 2
    moe_bias_update_rate: float = 1e-3  # gamma of DeepSeek-V3's aux-loss-free balancing
    # context
    embed_dim: int | None = None       # derived: max(8, d_model // 20) (Table 5's embed_dim)
    max_short: int = 20
    max_long: int = 100
    profile_fields: int = 8
    profile_vocab: int = 64
    item_hash_buckets: int = 8192
    n_duration_buckets: int = 16
    n_play_buckets: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads"):
            _check_positive(name, getattr(self, name))
        for name, value in self.derivations().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("d_head", "d_ff", "g_kv", "l_kv", "embed_dim", "codebook_size", "max_short",
                     "profile_vocab", "item_hash_buckets", "n_duration_buckets", "n_play_buckets"):
            _check_positive(name, getattr(self, name))
        if self.n_levels != 3:
            raise ValueError(f"n_levels: only 3 semantic-id levels are supported, got {self.n_levels}")
        if self.s_kv not in (1, 2):
            raise ValueError(f"s_kv: must be 1 (shared k = v) or 2 (separate), got {self.s_kv}")
        if self.n_heads % self.g_kv:
            raise ValueError(f"g_kv: {self.g_kv} must divide n_heads {self.n_heads}")
        if self.l_kv > self.n_layers:
            raise ValueError(f"l_kv: {self.l_kv} key-value layers exceed n_layers {self.n_layers}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size: must be >= 2, got {self.codebook_size}")
        if self.max_long < 0 or self.profile_fields < 0:
            raise ValueError("max_long and profile_fields must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.n_experts < 0:
            raise ValueError(f"n_experts: must be >= 0, got {self.n_experts}")
        if self.n_experts:
            if not 1 <= self.moe_top_k <= self.n_experts:
                raise ValueError(f"moe_top_k: {self.moe_top_k} must be in [1, n_experts={self.n_experts}]")
            _check_positive("moe_d_ff", self.moe_d_ff)
            if not 0 <= self.first_dense_layers <= self.n_layers:
                raise ValueError(f"first_dense_layers: {self.first_dense_layers} not in [0, {self.n_layers}]")
            if self.n_shared_experts < 0:
                raise ValueError("n_shared_experts: must be >= 0")

    def derivations(self) -> dict[str, int]:
        """What each derived field is, computed from its sources (d_model, n_heads)."""
        return {"d_head": self.d_model // self.n_heads, "d_ff": 4 * self.d_model, "g_kv": self.n_heads,
                "embed_dim": max(8, round(self.d_model / 20))}

    # ------------------------------------------------------------------ derived sizes
    @property
    def d_context(self) -> int:
        """Eq. (1): width of one context token after the context processor."""
        return self.s_kv * self.l_kv * self.g_kv * self.d_head

    @property
    def d_attn(self) -> int:
        """Width of the query / attention output: n_heads * d_head."""
        return self.n_heads * self.d_head

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.first_dense_layers

    def kv_layer(self, layer: int) -> int:
        """Eq. (9): l_kv = floor(l * L_kv / N_layer)."""
        return layer * self.l_kv // self.n_layers

    # ------------------------------------------------------------------ parameter counts
    def n_params(self, *, active: bool = False, include_sparse: bool = False) -> int:
        """Analytic parameter count of `learner.model.LazyDecoder` (tests check it equals the built model).

        `active`: count what one token computes with: shared + top-k experts in MoE layers, and no
        embedding tables (lookups, not matmuls) - the "0.5B active" of 4B-A0.5B.
        `include_sparse`: include the hashed item-id embedding table.
        """
        d, da, k = self.d_model, self.d_attn, self.codebook_size
        total = context_embedder_params(self, d_out=self.d_context, include_sparse=include_sparse,
                                        tables=not active)
        total += self.l_kv * self.s_kv * self.g_kv * self.d_head       # RMSNorm_{k,l}, RMSNorm_{v,l}
        total += 0 if active else (1 + 2 * k) * d                       # Embed([BOS, s1, s2]) eq. (5)
        for layer in range(self.n_layers):
            total += 3 * d                                              # three pre-norms
            total += 2 * d * da                                         # lazy cross-attn: W_q, W_o only
            total += 4 * d * da                                         # self-attn: W_q, W_k, W_v, W_o
            if self.is_moe_layer(layer):
                routed = self.moe_top_k if active else self.n_experts
                total += d * self.n_experts                             # router
                total += (self.n_shared_experts + routed) * 3 * d * self.moe_d_ff
            else:
                total += 3 * d * self.d_ff                              # SwiGLU FFN
        total += 3 * (d + d * k)                                        # position-specific norm + head
        return total

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """The preset `name` with `overrides` on top, constructed (derived and validated) once."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r} (known: {sorted(PRESETS)})")
        return cls(**{"name": name, **PRESETS[name], **overrides})

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed; a derived field equal to its derivation here is re-derived unless given."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in self.derivations().items():
            if values[name] == value:
                values[name] = None
        values.update(changes)
        return ModelConfig(**values)


def context_embedder_params(cfg: ModelConfig, *, d_out: int, include_sparse: bool = False,
                            tables: bool = True) -> int:
    """Parameters of `learner.context.ContextEmbedder` projecting to d_out (shared with the baselines).

    `tables=False` counts only the projections (what is multiplied, not looked up)."""
    e, k = cfg.embed_dim, cfg.codebook_size
    if not tables:
        return N_ITEM_FEATURES * e * d_out + e * d_out
    total = 3 * (k + 1) * e                                   # semantic ids (+1: item unknown to the tokenizer)
    total += (cfg.n_duration_buckets + cfg.n_play_buckets + N_FLAG_VALUES + 2 + N_RECENCY_BUCKETS) * e
    total += N_ITEM_FEATURES * e * d_out                      # item projection
    total += max(1, cfg.profile_fields * cfg.profile_vocab) * e + e * d_out  # profile fields + projection
    if include_sparse:
        total += cfg.item_hash_buckets * e
    return total


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive int, got {value!r}")


# presets use 26 profile fields: the KuaiRand-Pure user features the embedded default ships
_TABLE5 = dict(codebook_size=8192, max_short=64, max_long=440, item_hash_buckets=1 << 18,
               profile_fields=26, n_duration_buckets=32, n_play_buckets=32)

# name -> overrides of the defaults. Reproduce the counts: python -c "from learner.config import *;
# [print(n, ModelConfig.from_name(n).n_params() / 1e9) for n in PRESETS]"
PRESETS: dict[str, dict] = {
    # trains on 2 CPU cores in well under 2 GB
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, codebook_size=64, embed_dim=16,
                 max_short=20, max_long=100, item_hash_buckets=8192, profile_fields=26),
    "0.1B": dict(_TABLE5, d_model=640, n_layers=12, n_heads=10, embed_dim=32, d_ff=1920),
    "0.2B": dict(_TABLE5, d_model=896, n_layers=12, n_heads=14, embed_dim=45, d_ff=3200),
    "0.5B": dict(_TABLE5, d_model=1408, n_layers=14, n_heads=11, embed_dim=70, d_ff=4608),
    "1B": dict(_TABLE5, d_model=1792, n_layers=18, n_heads=14, embed_dim=90, d_ff=5952),
    "2B": dict(_TABLE5, d_model=2304, n_layers=22, n_heads=18, embed_dim=115, d_ff=7936),
    "4B": dict(_TABLE5, d_model=2944, n_layers=26, n_heads=23, embed_dim=147, d_ff=10944),
    "8B": dict(_TABLE5, d_model=3584, n_layers=34, n_heads=28, embed_dim=179, d_ff=14336),
    # 0.5B base; FFNs after the first 2 blocks become 53 routed + 1 shared experts, top-3, width 1408
    "4B-A0.5B": dict(_TABLE5, d_model=1408, n_layers=14, n_heads=11, embed_dim=70, d_ff=4608,
                     n_experts=53, n_shared_experts=1, moe_top_k=3, moe_d_ff=1408, first_dense_layers=2),
}

# the report's "Parameters" column (total; MoE active 0.5B), for the preset test
TABLE5_PARAMS: dict[str, float] = {"0.1B": 0.1e9, "0.2B": 0.2e9, "0.5B": 0.5e9, "1B": 1e9, "2B": 2e9,
                                   "4B": 4e9, "8B": 8e9, "4B-A0.5B": 4e9}


# Table 5's learning rate per preset; tiny (ours, not in the table) keeps 1e-3
PRESET_LR: dict[str, float] = {"tiny": 1e-3, "0.1B": 5.00e-4, "0.2B": 3.54e-4, "0.5B": 2.24e-4, "1B": 1.58e-4,
                               "2B": 1.12e-4, "4B": 7.91e-5, "8B": 5.59e-5, "4B-A0.5B": 2.24e-4}
RL_LEVELS = ("token", "item")
RL_NORMALIZATIONS = ("group", "active")


@dataclass
class TrainConfig:
    """Training knobs. The loss is `sft_weight * L_Gen + rl_weight * RL` (section 3):

    - `sft_weight`, `rl_weight`: the relative weight of L_Gen (eq. 10, mean over tokens and rows)
      and the RL term. With `rl_normalization = "group"` the RL term is eq. 11's 1/G sum over the
      batch, so at ratio 1 it is -(positives - dislikes) / G: rl_weight = 1 gives a positive row
      the same weight as L_Gen gives one row.
    - `rl_level`: token (default) | item, see learner.losses for the numbers behind the default.
    - `rl_normalization`: group (default, eq. 11) | active (mean over the rows with A != 0).
    - `tau_window`: tau_B (sec. 3.1.1) is the top-quartile threshold of the last `tau_window` q
      values this learner saw (the current micro-batch included), not of one micro-batch.
    - `gen_on_dislikes`: false (default) leaves disliked exposures out of L_Gen, which would
      otherwise push up the tokens of an item the RL term pushes down: on a target token's logit
      L_Gen pushes up by (1 - p) and token-level GBPO down by p (p / (1 - p) on log p, eq. 12's
      BCE bound), both / 3G, so at equal weights a dislike with p < 0.5 would be learned *up*.
    - `lr`: None = the preset's Table 5 rate (`PRESET_LR`), reached by a linear warm-up over
      `warmup_steps` optimizer steps (`lr_at`).
    """

    lr: float | None = None          # None: PRESET_LR[model preset] (Table 5; tiny 1e-3)
    warmup_steps: int = 100          # linear warm-up from lr / warmup_steps to lr
    batch_size: int = 64
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    sft_weight: float = 1.0          # weight of L_Gen on streamed samples
    rl_weight: float = 1.0           # weight of the GBPO / ECPO term
    algorithm: str = "gbpo"          # gbpo | ecpo | sft
    rl_on: str = "all"               # which exposures the RL term trains on: all | legacy (Table 6's
                                     # "w/o OneRec samples") | onerec; L_Gen always sees every exposure
    ecpo_eps: float = 0.2            # ECPO clip (eq. 13)
    ecpo_delta: float = 0.1          # ECPO early-clip margin (eq. 14)
    rl_level: str = "token"          # token | item: where the ratio and bound of eqs. 11-14 apply
    rl_normalization: str = "group"  # group (eq. 11's 1/G over the batch) | active (rows with A != 0)
    tau_window: int = 512            # q values tau_B is the top quartile of (rolling, per learner)
    gen_on_dislikes: bool = False    # True: L_Gen also trains on disliked exposures
    device: str = "auto"             # auto | cpu | cuda
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ("gbpo", "ecpo", "sft"):
            raise ValueError(f"algorithm: must be gbpo, ecpo or sft, got {self.algorithm!r}")
        if self.rl_on not in ("all", "legacy", "onerec"):
            raise ValueError(f"rl_on: must be all, legacy or onerec, got {self.rl_on!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: must be > 0 (or unset for the preset's Table 5 rate), got {self.lr}")
        if self.rl_level not in RL_LEVELS:
            raise ValueError(f"rl_level: must be one of {RL_LEVELS}, got {self.rl_level!r}")
        if self.rl_normalization not in RL_NORMALIZATIONS:
            raise ValueError(f"rl_normalization: must be one of {RL_NORMALIZATIONS}, got {self.rl_normalization!r}")
        for name in ("warmup_steps", "tau_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "tau_window" else 0):
                raise ValueError(f"{name}: must be an int >= {1 if name == 'tau_window' else 0}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {self.batch_size!r}")
        for name in ("weight_decay", "grad_clip", "sft_weight", "rl_weight", "ecpo_eps", "ecpo_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: must be auto, cpu or cuda[:N], got {self.device!r}")

    def base_lr(self, preset: str) -> float:
        """`lr` if set, else Table 5's rate of the model preset (PRESET_LR); unknown preset: an error."""
        if self.lr is not None:
            return self.lr
        if preset not in PRESET_LR:
            raise ValueError(f"lr: no Table 5 rate for model preset {preset!r} (known: {sorted(PRESET_LR)}); "
                             f"set train.lr")
        return PRESET_LR[preset]

    def lr_at(self, step: int, preset: str) -> float:
        """The rate of optimizer step `step` (0-based): base_lr * min(1, (step + 1) / warmup_steps)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        base = self.base_lr(preset)
        return base if self.warmup_steps == 0 else base * min(1.0, (step + 1) / self.warmup_steps)

    def resolve_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
