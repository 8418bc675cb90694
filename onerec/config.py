"""The one config object: every section in one dataclass, loadable from TOML, overridable on the CLI.

Invariant: each section is constructed exactly once, from its merged values - the section's defaults
(the model preset for `[model]`) < the TOML file's table < the `--set section.key=value` overrides -
converted to the fields' types; so each section validates once and an error names `section.key`.
Each package owns the dataclass of its own section (learner/config.py, streaming/config.py,
actors/config.py (loop and drift), serving_bridge/config.py, simulator/config.py); this module only
composes them, so `learner` still imports nothing of the others. Nothing here imports torch or Ray.

    cfg = Config.from_name("tiny")                       # model preset from Table 5 or "tiny"
    cfg = Config.load("deploy.toml", overrides=["model.n_layers=4", "stream.bootstrap_servers=k:9092"])
    cfg = Config.build("tiny", {"loop": {"n_replicas": 3}})
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
from serving_bridge.config import ServeConfig
from simulator.config import SimulatorConfig
from streaming.config import StreamConfig

# section name -> its dataclass (the model's is built from its preset, see Config.build)
SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "stream": StreamConfig, "loop": LoopConfig,
                             "serve": ServeConfig, "simulator": SimulatorConfig, "drift": DriftConfig}
# keys that moved to another section: naming the old one is an error that names the new one
MOVED_KEYS: dict[str, str] = {
    **{f"loop.{key}": f"serve.{key}" for key in ("bridge_host", "bridge_port", "api_token", "request_timeout_s")},
    "loop.sim_users": "simulator.users", "loop.sim_concurrency": "simulator.concurrency",
    "loop.sim_legacy_share": "simulator.legacy_share",
    "loop.sim_users_per_s": "simulator.concurrency (the World's clock runs as fast as pages are served)"}


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    @classmethod
    def from_name(cls, preset: str) -> "Config":
        return cls.build(preset, {})

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None,
             preset: str | None = None) -> "Config":
        """Preset, then the TOML file's tables, then `section.key=value` overrides, in that order."""
        tables: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                tables = tomllib.load(f)
        file_preset = tables.pop("preset", None)
        merged: dict[str, dict[str, Any]] = {}
        for section, values in tables.items():
            if not isinstance(values, dict):
                raise ValueError(f"config {path}: top-level key {section!r} must be a table like [{section}]")
            for key, value in values.items():
                _put(merged, f"{section}.{key}", value)
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            _put(merged, key.strip(), _parse_scalar(raw.strip()))
        return cls.build(preset or file_preset or "tiny", merged)

    @classmethod
    def build(cls, preset: str, values: dict[str, dict[str, Any]]) -> "Config":
        """Every section constructed once from its defaults overlaid with `values[section]` (checked, converted)."""
        checked: dict[str, dict[str, Any]] = {}
        for section, table in values.items():
            for key, value in table.items():
                _put(checked, f"{section}.{key}", value)
        sections = {}
        for name, section_type in SECTIONS.items():
            hints = typing.get_type_hints(section_type)
            kwargs = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in checked.get(name, {}).items()}
            try:
                sections[name] = (ModelConfig.from_name(preset, **kwargs) if name == "model"
                                  else section_type(**kwargs))
            except ValueError as exc:
                raise ValueError(_naming_section(name, str(exc))) from None
        return cls(preset=preset, **sections)

    @staticmethod
    def section_names() -> list[str]:
        return list(SECTIONS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _put(merged: dict[str, dict[str, Any]], dotted: str, value: Any) -> None:
    """merged[section][key] = value, after checking that `section.key` names a field."""
    section, _, key = dotted.partition(".")
    if not key:
        raise ValueError(f"config key {dotted!r} must be section.key (sections: {list(SECTIONS)})")
    if dotted in MOVED_KEYS:
        raise ValueError(f"config key {dotted!r} moved: it is now {MOVED_KEYS[dotted]!r}")
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r} (sections: {list(SECTIONS)})")
    known = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in known:
        raise ValueError(f"unknown config key {dotted!r} (known: {sorted(known)})")
    merged.setdefault(section, {})[key] = value


def _naming_section(section: str, message: str) -> str:
    """A section's validation message, prefixed with the section unless it already names it."""
    if message.startswith(f"{section}."):
        return message
    if section == "model" and message.startswith("unknown model preset"):
        return message
    return f"{section}.{message}"


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
