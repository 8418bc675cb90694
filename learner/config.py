"""PLACEHOLDER (owned by the model work): ModelConfig with presets, TrainConfig."""
from dataclasses import dataclass


@dataclass
class ModelConfig:
    name: str = "tiny"

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        return cls(name=name)


@dataclass
class TrainConfig:
    lr: float = 1e-3
