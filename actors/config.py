"""PLACEHOLDER (owned by the loop work): LoopConfig."""
from dataclasses import dataclass


@dataclass
class LoopConfig:
    n_replicas: int = 2
