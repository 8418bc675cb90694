"""Shared set-up for the loop tests (learner, replicas, bridge): one tokenizer fit per test process."""
from __future__ import annotations

from functools import lru_cache

from simulator import kuairand
from onerec.config import Config


def loop_config(tmp_path, **loop_overrides) -> Config:
    """The tiny preset with checkpoints under tmp_path and CPU-test-friendly cadences."""
    cfg = Config.from_name("tiny")
    if cfg.model.profile_fields != kuairand.PROFILE_FIELDS:   # contexts carry KuaiRand's profile fields
        cfg.model = cfg.model.replace(profile_fields=kuairand.PROFILE_FIELDS)
    cfg.loop.checkpoint_dir = str(tmp_path / "checkpoints")
    cfg.loop.init_from = ""
    cfg.train.device = "cpu"
    for key, value in loop_overrides.items():
        setattr(cfg.loop, key, value)
    cfg.loop.__post_init__()
    return cfg


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
