"""Shared set-up for the loop tests (learner, replicas, bridge): one tokenizer fit per test process."""
from __future__ import annotations

from functools import lru_cache

from simulator import kuairand
from onerec.config import Config


def loop_config(tmp_path, *, serve: dict | None = None, **loop_overrides) -> Config:
    """The tiny preset with checkpoints under tmp_path and CPU-test-friendly cadences; `serve`: [serve] keys."""
    return Config.build("tiny", {
        "model": {"profile_fields": kuairand.PROFILE_FIELDS},   # contexts carry KuaiRand's profile fields
        "loop": {"checkpoint_dir": str(tmp_path / "checkpoints"), "init_from": "", **loop_overrides},
        "train": {"device": "cpu"},
        "serve": serve or {},
        "drift": {"log_path": str(tmp_path / "drift.jsonl")},   # never the user's runs/drift.jsonl
    })


@lru_cache(maxsize=1)
def _tokenizer_bytes(codebook_size: int) -> bytes:
    from learner.tokenizer import tokenizer_bytes

    return tokenizer_bytes(kuairand.item_catalogue().fit_tokenizer(codebook_size))


def tokenizer(codebook_size: int):
    """The KuaiRand tokenizer of the tiny preset (fitted once per process, a fresh copy each call)."""
    from learner.tokenizer import SemanticTokenizer

    return SemanticTokenizer.load(_tokenizer_bytes(codebook_size))


def tokenizer_blob(codebook_size: int) -> bytes:
    return _tokenizer_bytes(codebook_size)


def start_replicas(cfg, n: int = 2, *, seed: int = 0) -> list:
    """`n` CPU replica actors serving one randomly initialised model (torch seed `seed`) as version 1."""
    import ray
    import torch

    from actors.publisher import checksum_of, pack_weights
    from actors.replica import ReplicaActor
    from learner.model import LazyDecoder

    torch.manual_seed(seed)
    packed = pack_weights(LazyDecoder(cfg.model).state_dict())
    ref = ray.put(packed)
    blob = tokenizer_blob(cfg.model.codebook_size)
    replicas = [ReplicaActor.options(num_cpus=0.25).remote(cfg.model, blob, 1, ref, checksum_of(packed))
                for _ in range(n)]
    ray.get([r.version.remote() for r in replicas], timeout=120)
    return replicas

