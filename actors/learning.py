"""The learning side: samples in, one optimizer step, metrics out. No Kafka, no Ray: tests drive it in-process.

Loss per step (report section 3): `sft_weight * L_Gen` over every exposure (eq. 10) plus
`rl_weight * GBPO` (eqs. 11-12; or ECPO, eqs. 13-14; none for `sft`) over the samples with A != 0.
A comes from `streaming.reward.advantages` on the step's samples that have feedback (sec. 3.1.1),
against tau_B = the top quartile of the last `train.tau_window` q values this learner saw (the
report's "in a batch", made a batch large enough to mean something and independent of the
micro-batch size; the current samples enter the window first, so the very first sample is its own
tau_B and not positive); `train.rl_on = "legacy"` keeps A only on samples from the legacy traffic
(Table 6's "w/o OneRec samples"); `train.gen_on_dislikes = false` leaves disliked exposures out of
L_Gen. One forward per step (`learner.step.train_step`) gives L_Gen and the per-token log-probs;
their sum is log pi, the same quantity the replicas log as pi_old. The rate of step n is
`train.lr_at(n, preset)`: Table 5's rate with linear warm-up; the MoE balancing bias moves in the
step's one forward, so once per optimizer step.

Invariant: `update` either takes one optimizer step on the samples it kept, or (no usable samples,
a batch the model cannot take, a non-finite loss) changes no weight, and says which in its counters.
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import torch

from learner.checkpoint import load_optimizer, optimizer_tensors
from learner.config import ModelConfig
from learner.features import build_context_batch
from learner.model import LazyDecoder
from learner.step import StepBatch, StepWeights, train_step
from learner.tokenizer import SemanticTokenizer
from streaming.reward import advantages, tau_threshold

log = logging.getLogger(__name__)

RL_SOURCES = {"all": ("onerec", "legacy"), "legacy": ("legacy",), "onerec": ("onerec",)}


class PolicyLearner:
    """The policy, its optimizer and the per-version accounting of what users did with it."""

    def __init__(self, model_cfg: ModelConfig, train_cfg, tokenizer: SemanticTokenizer, *,
                 model: LazyDecoder | None = None, device: str | torch.device = "cpu"):
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model = (model if model is not None else LazyDecoder(model_cfg)).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_cfg.lr_at(0, model_cfg.name),
                                           weight_decay=train_cfg.weight_decay)
        self.q_window: collections.deque[float] = collections.deque(maxlen=train_cfg.tau_window)
        self.weights = StepWeights.from_train(train_cfg)
        self.rl_sources = RL_SOURCES[getattr(train_cfg, "rl_on", "all")]
        self.step = 0
        self.stats = collections.Counter()        # trained, steps, bad, unknown_items, failed_batches, ...
        self.by_version: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.last_losses: dict[str, float] = {}

    # ---- one step ------------------------------------------------------------------------------
    def update(self, samples: list[dict]) -> dict | None:
        """Train one step on the usable samples; None when no step was taken (see the counters)."""
        samples = self._featurizable(self._with_semantic_ids(samples))
        if not samples:
            return None
        try:
            batch = self._batch(samples)
            for group in self.optimizer.param_groups:      # linear warm-up to Table 5's rate
                group["lr"] = self.train_cfg.lr_at(self.step, self.model_cfg.name)
            result = train_step(self.model, self.optimizer, batch, weights=self.weights)
        except (RuntimeError, ValueError) as exc:   # a batch the model cannot take: skip it, loudly
            self.stats["failed_batches"] += 1
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("batch of %d samples skipped, the model failed on it: %s", len(samples), exc)
            return None
        if not result.finite:   # skip the step rather than poison the weights; counted and logged
            self.stats["nonfinite_steps"] += 1
            log.warning("non-finite loss at step %d (gen=%s rl=%s): step skipped", self.step, result.gen, result.rl)
            return None
        self.step += 1
        self.stats["steps"] += 1
        self.stats["trained"] += len(samples)
        self._account(samples, batch.adv)
        self.last_losses = {"loss": result.loss, "gen": result.gen, "rl": result.rl}
        return {**self.last_losses, "samples": len(samples), "positives": result.positives,
                "negatives": result.negatives, "trained": samples}

    def _with_semantic_ids(self, samples: list[dict]) -> list[dict]:
        """Legacy traffic may carry no semantic id: look it up; drop ids outside the codebook (counted)."""
        kept = []
        for sample in samples:
            if sample["semantic_id"] is None:
                codes, known = self.tokenizer.lookup([sample["item_id"]])
                if not known[0]:
                    self.stats["unknown_items"] += 1
                    continue
                sample = {**sample, "semantic_id": codes[0].tolist()}
            if max(sample["semantic_id"]) >= self.model_cfg.codebook_size:
                self.stats["bad"] += 1
                log.warning("sample %s/%s skipped: semantic_id %s outside the codebook",
                            sample["request_id"], sample["item_id"], sample["semantic_id"])
                continue
            kept.append(sample)
        return kept

    def _featurizable(self, samples: list[dict]) -> list[dict]:
        """Drop (and count) samples whose context the featurizer rejects, naming the reason."""
        if not samples:
            return samples
        try:
            build_context_batch([s["context"] for s in samples], self.tokenizer, self.model_cfg)
            return samples
        except ValueError:
            pass
        kept = []
        for sample in samples:
            try:
                build_context_batch([sample["context"]], self.tokenizer, self.model_cfg)
                kept.append(sample)
            except ValueError as exc:
                self.stats["bad"] += 1
                log.warning("sample %s/%s skipped: %s", sample["request_id"], sample["item_id"], exc)
        return kept

    def _batch(self, samples: list[dict]) -> StepBatch:
        ctx = build_context_batch([s["context"] for s in samples], self.tokenizer, self.model_cfg).to(self.device)
        target = torch.tensor([s["semantic_id"] for s in samples], dtype=torch.long, device=self.device)  # (B, 3)
        logp_old = torch.tensor([s["logprob"] if s["logprob"] is not None else float("nan") for s in samples],
                                dtype=torch.float32, device=self.device)                             # (B,)
        gen_mask = None
        if not self.train_cfg.gen_on_dislikes:
            gen_mask = torch.tensor([not (s["feedback"] is not None and s["feedback"]["dislike"]) for s in samples],
                                    dtype=torch.bool, device=self.device)                            # (B,)
        return StepBatch(ctx, target, logp_old=logp_old, adv=self.advantages(samples).to(self.device),
                         gen_mask=gen_mask)

    def advantages(self, samples: list[dict]) -> torch.Tensor:
        """A per sample: `streaming.reward.advantages` over those with feedback (sec. 3.1.1), 0 for the
        rest and for samples whose source the RL term does not use (`train.rl_on`).

        Their q join the rolling window first; tau_B is the window's top-quartile threshold.
        """
        adv = np.zeros(len(samples), dtype=np.float32)
        with_feedback = [i for i, s in enumerate(samples) if s["feedback"] is not None]
        if with_feedback:
            q = np.array([samples[i]["q"] for i in with_feedback], dtype=np.float64)
            dislike = np.array([samples[i]["feedback"]["dislike"] for i in with_feedback], dtype=bool)
            if not np.isfinite(q).all():
                raise ValueError("samples with feedback must have a finite q")
            self.q_window.extend(q.tolist())
            tau = tau_threshold(self.q_window, top_fraction=0.25)
            adv[with_feedback] = advantages(q, dislike, top_fraction=0.25, tau=tau)
        adv[[i for i, s in enumerate(samples) if s["source"] not in self.rl_sources]] = 0.0
        return torch.from_numpy(adv)

    def _account(self, samples: list[dict], adv: torch.Tensor) -> None:
        """Per served version: what the users did with what that version recommended."""
        for sample, a in zip(samples, adv.tolist()):
            c = self.by_version[sample["model_version"]]
            c["samples"] += 1
            fb = sample["feedback"]
            if fb is not None:
                c["feedback"] += 1
                c["positives"] += a > 0
                c["dislikes"] += bool(fb["dislike"])
                c["play_time_ms"] += int(1000 * fb["play_time_s"])

    # ---- state -----------------------------------------------------------------------------------
    def state_files(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Tensor groups and manifest entries of a checkpoint of this side."""
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        files = {"model": self.model.state_dict(), "optimizer": opt_tensors, "tokenizer": self.tokenizer.to_tensors()}
        return files, {"step": self.step, "param_groups": groups, "algorithm": self.weights.algorithm,
                       "q_window": list(self.q_window)}

    def load_state(self, files: dict[str, dict[str, torch.Tensor]], manifest: dict) -> None:
        self.model.load_state_dict(files["model"])
        load_optimizer(self.optimizer, files["optimizer"], manifest["param_groups"])
        self.step = int(manifest["step"])
        self.q_window.clear()
        self.q_window.extend(float(q) for q in manifest.get("q_window", []))

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """New weights (a rollback): the optimizer's moments of the abandoned weights no longer apply."""
        self.model.load_state_dict(state_dict)
        self.optimizer.state.clear()
