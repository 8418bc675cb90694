"""Checkpoints: the one store that the online learner, pretraining and `loop.init_from` share.

Invariants:
- tensors only ever travel as plain safetensors, never as pickles; optimizer state is flattened to
  named tensors plus JSON param groups;
- a checkpoint is a folder `step-00000042/` under an fsspec URL (local path, s3://, memory://) with
  one `<group>.safetensors` per tensor group and `manifest.json`, written LAST: a folder without a
  manifest does not exist, so a crash mid-save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import collections
import json
import time

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MANIFEST = "manifest.json"


def plain_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; entries sharing storage are cloned (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"checkpoint entry {name!r}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def tensors_from_bytes(data: bytes, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors; anything else is a ValueError naming `what`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what}: expected safetensors bytes, got {type(data).__name__}")
    try:
        return st_load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt input
        raise ValueError(f"{what}: not a valid safetensors blob ({exc})") from None


class CheckpointStore:
    """Checkpoint folders `step-00000042/` under an fsspec URL; keeps the newest `keep`."""

    def __init__(self, url: str, *, keep: int = 3):
        if not url:
            raise ValueError("checkpoint URL must not be empty")
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.keep = keep

    def _folders(self) -> list[str]:
        """Complete checkpoints (manifest present), oldest first."""
        if not self.fs.exists(self.root):
            return []
        done = []
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and self.fs.exists(f"{path}/{MANIFEST}"):
                done.append(path.rstrip("/"))
        return sorted(done)

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], manifest: dict) -> str:
        """Write each tensor group as `<name>.safetensors`, then the manifest; prune old ones."""
        folder = f"{self.root}/step-{step:08d}"
        self.fs.makedirs(folder, exist_ok=True)
        for name, tensors in files.items():
            with self.fs.open(f"{folder}/{name}.safetensors", "wb") as f:
                f.write(st_save(plain_tensors(tensors)))
        manifest = {**manifest, "files": sorted(f"{n}.safetensors" for n in files), "saved_at": time.time()}
        with self.fs.open(f"{folder}/{MANIFEST}", "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
        for old in self._folders()[:-self.keep]:
            self.fs.rm(old, recursive=True)
        return folder

    def latest(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
        """(manifest with "path", {group name: tensors}) of the newest complete checkpoint, or None."""
        folders = self._folders()
        if not folders:
            return None
        folder = folders[-1]
        with self.fs.open(f"{folder}/{MANIFEST}", "rb") as f:
            manifest = json.loads(f.read())
        files = {}
        for file_name in manifest["files"]:
            with self.fs.open(f"{folder}/{file_name}", "rb") as f:
                files[file_name.removesuffix(".safetensors")] = tensors_from_bytes(f.read(),
                                                                                    what=f"{folder}/{file_name}")
        manifest["path"] = folder
        return manifest, files


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer state dict to named tensors + JSON param groups (no pickles)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state[int(index)][key] = value
    optimizer.load_state_dict({"state": dict(state), "param_groups": groups})
