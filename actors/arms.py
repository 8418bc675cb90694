"""The arms of an A/B run: what each one is, and the per-arm sections its learner and replicas get.

Invariant: arms are fixed before anything starts; a bad arm list stops `onerec ab` with a message
naming the arm, before any process is started. Learned arms each get their own learner (own consumer
group, checkpoints and versions) and replicas; fixed arms are served by the traffic itself.

| arm | what serves it | objective |
| --- | --- | --- |
| gbpo | the lazy decoder | L_Gen + GBPO (eqs. 10-12) on every exposure |
| ecpo | the lazy decoder | L_Gen + ECPO (eqs. 13-14), OneRec-V1's baseline |
| sft | the lazy decoder | L_Gen only (eq. 10) |
| gbpo-legacy | the lazy decoder | L_Gen + GBPO on legacy exposures only (Table 6's "w/o OneRec samples") |
| popular | most played so far | none |
| random | uniform over the catalogue | none |
| oracle | the world's best expected play time | none (the upper bracket) |
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LEARNED = {"gbpo": ("gbpo", "all"), "ecpo": ("ecpo", "all"), "sft": ("sft", "all"),
           "gbpo-legacy": ("gbpo", "legacy")}
FIXED = ("popular", "random", "oracle")
DEFAULT_AB_ARMS = ("gbpo", "ecpo", "sft", "gbpo-legacy", "popular", "random", "oracle")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    learned: bool
    algorithm: str | None = None   # learned arms: gbpo | ecpo | sft
    rl_on: str = "all"             # learned arms: which exposures the RL term uses


def parse_arms(names, *, require_sft: bool) -> list[ArmSpec]:
    """Arm specs in the given order; unknown or repeated names and a missing `sft` raise ValueError."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not names:
        raise ValueError("no arms given (known: " + ", ".join([*LEARNED, *FIXED]) + ")")
    specs, seen = [], set()
    for name in names:
        if name in seen:
            raise ValueError(f"arm {name!r} is listed twice")
        seen.add(name)
        if name in LEARNED:
            algorithm, rl_on = LEARNED[name]
            specs.append(ArmSpec(name, True, algorithm, rl_on))
        elif name in FIXED:
            specs.append(ArmSpec(name, False))
        else:
            raise ValueError(f"unknown arm {name!r} (known: {', '.join([*LEARNED, *FIXED])})")
    if require_sft and "sft" not in seen:
        raise ValueError("an A/B run needs the `sft` arm: every other arm is reported against it")
    if not any(s.learned for s in specs):
        raise ValueError("at least one learned arm (gbpo, ecpo, sft, gbpo-legacy) is needed")
    return specs


def arm_sections(spec: ArmSpec, train, loop, *, single: bool):
    """(train, loop) for one learned arm: its objective, and its own checkpoints and consumer group.
    A run with one learned arm keeps the configured paths (so `onerec run` resumes as before)."""
    if not spec.learned:
        raise ValueError(f"arm {spec.name!r} is not a learned arm")
    train = dataclasses.replace(train, algorithm=spec.algorithm, rl_on=spec.rl_on)
    if not single:
        loop = dataclasses.replace(loop, checkpoint_dir=f"{loop.checkpoint_dir.rstrip('/')}/{spec.name}",
                                   init_from=loop.init_from)
    return train, loop
