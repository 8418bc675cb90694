"""PLACEHOLDER (owned by the evaluation work): SimulatorConfig."""
from dataclasses import dataclass


@dataclass
class SimulatorConfig:
    seed: int = 0
