"""Weights as safetensors bytes, and checkpoints through fsspec (local paths, s3://, memory://).

Invariant: weights only ever travel as plain tensors (safetensors), never as pickles; a checkpoint
file is written under a temporary name and renamed, so a reader never sees half of one.

A checkpoint is one safetensors file: tensors by name plus a JSON manifest in its metadata
(`"manifest"` key). `save_model` / `load_model` put the model (prefix `model.`) and the tokenizer
(prefix `tokenizer.`) in one file with the ModelConfig in the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from learner.config import ModelConfig

FORMAT = "onerec-checkpoint-v1"


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, CPU tensors; storage shared between entries is cloned (safetensors refuses it)."""
    out, seen = {}, set()
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state dict entry {name!r}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def state_dict_to_bytes(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save(_plain(sd), metadata=metadata)


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"weights: expected safetensors bytes, got {type(data).__name__}")
    try:
        return st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for corrupt input
        raise ValueError(f"weights: not a valid safetensors blob ({exc})") from None


def save_state(fs_path: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Write tensors + JSON manifest to fs_path (any fsspec URL) atomically (temp name, then rename)."""
    data = state_dict_to_bytes(tensors, metadata={"format": FORMAT, "manifest": json.dumps(manifest)})
    fs, path = fsspec.core.url_to_fs(fs_path)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def load_state(fs_path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (tensors, manifest) of a checkpoint written by save_state."""
    fs, path = fsspec.core.url_to_fs(fs_path)
    with fs.open(path, "rb") as f:
        data = f.read()
    tensors = state_dict_from_bytes(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{fs_path}: not an onerec checkpoint (format {meta.get('format')!r})")
    return tensors, json.loads(meta.get("manifest", "{}"))


def save_model(fs_path: str, model: torch.nn.Module, tokenizer=None, manifest: dict[str, Any] | None = None) -> None:
    """Model weights (+ tokenizer) + manifest {"model_config": ..., **manifest} in one file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if tokenizer is not None:
        tensors.update({f"tokenizer.{k}": v for k, v in tokenizer.to_tensors().items()})
    full = {"model_config": dataclasses.asdict(model.cfg), "model_class": type(model).__name__,
            **(manifest or {})}
    save_state(fs_path, tensors, full)


def load_model(fs_path: str, device: str | torch.device = "cpu"):
    """-> (LazyDecoder in eval mode, SemanticTokenizer or None, manifest)."""
    from learner.model import LazyDecoder
    from learner.tokenizer import SemanticTokenizer

    tensors, manifest = load_state(fs_path)
    if "model_config" not in manifest:
        raise ValueError(f"{fs_path}: manifest has no model_config")
    cfg = ModelConfig(**manifest["model_config"])
    model = LazyDecoder(cfg)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    tok_tensors = {k[len("tokenizer."):]: v for k, v in tensors.items() if k.startswith("tokenizer.")}
    tokenizer = SemanticTokenizer.from_tensors(tok_tensors) if tok_tensors else None
    return model.to(device).eval(), tokenizer, manifest
