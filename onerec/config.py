"""The one config object: every section in one dataclass, loadable from TOML, overridable on the CLI.

Each package owns the dataclass of its own section (learner/config.py, streaming/config.py,
actors/config.py (loop and drift), simulator/config.py); this module only composes them, so `learner`
still imports nothing of the others.

    cfg = Config.from_name("tiny")                       # model preset from Table 5 or "tiny"
    cfg = Config.load("deploy.toml", overrides=["model.n_layers=4", "stream.bootstrap_servers=k:9092"])
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import DriftConfig, LoopConfig
from learner.config import ModelConfig, TrainConfig
from simulator.config import SimulatorConfig
from streaming.config import StreamConfig


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    @classmethod
    def from_name(cls, preset: str) -> "Config":
        return cls(preset=preset, model=ModelConfig.from_name(preset))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None,
             preset: str | None = None) -> "Config":
        """Preset, then the TOML file's tables, then `section.key=value` overrides, in that order."""
        data: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        name = preset or data.pop("preset", None) or "tiny"
        data.pop("preset", None)
        cfg = cls.from_name(name)
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ValueError(f"config {path}: top-level key {section!r} must be a table like [{section}]")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            cfg.set(key.strip(), _parse_scalar(raw.strip()))
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.key` to value, converting to the field's type; unknown names raise ValueError."""
        section_name, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"config key {dotted!r} must be section.key (sections: {self.section_names()})")
        if section_name not in self.section_names():
            raise ValueError(f"unknown config section {section_name!r} (sections: {self.section_names()})")
        section = getattr(self, section_name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise ValueError(f"unknown config key {dotted!r} (known: {sorted(fields)})")
        hints = typing.get_type_hints(type(section))
        setattr(section, key, _coerce(value, hints[key], dotted))
        if hasattr(section, "__post_init__"):
            section.__post_init__()

    @staticmethod
    def section_names() -> list[str]:
        return ["model", "train", "stream", "loop", "simulator", "drift"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
        if origin in (list, tuple):
            seq = value if isinstance(value, (list, tuple)) else [value]
            inner = typing.get_args(hint)[0] if typing.get_args(hint) else None
            seq = [inner(v) if inner in (int, float, str) else v for v in seq]
            return tuple(seq) if origin is tuple else list(seq)
    except (TypeError, ValueError):
        raise ValueError(f"config {name}: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value
