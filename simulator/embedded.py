"""The embedded world's side of the seams: what `onerec run` and `onerec serve` hand to serving and training.

Invariant: this is the only door through which the loop reaches the demo data set. Serving and
training see an `ItemCatalogue`, a source of user views (`learner.history.UserHistory`) and a model
config whose profile shape matches the contexts; a platform team hands over its own instead.
"""
from __future__ import annotations

from learner.catalogue import ItemCatalogue
from learner.config import ModelConfig
from learner.history import UserHistory
from simulator import kuairand


def item_catalogue() -> ItemCatalogue:
    return kuairand.item_catalogue()


def user_views(*, short_len: int, long_len: int) -> UserHistory:
    """KuaiRand users' views, starting from their pre-week histories."""
    return kuairand.UserHistory(short_len=short_len, long_len=long_len, warm_start=True)


def model_config(model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with the profile shape of the contexts this world builds (KuaiRand's 26 fields)."""
    return kuairand.fit_profile(model_cfg)


def probe_contexts(model_cfg: ModelConfig, n: int = 32) -> list[dict]:
    """Fixed contexts of `n` users with a history: the drift monitor's probe set."""
    history = kuairand.UserHistory(short_len=model_cfg.max_short, long_len=model_cfg.max_long)
    hist = kuairand.read_user_history()
    users = [u for u in sorted(hist) if hist[u].get("watch_seq")][:n]
    return [history.context(u) for u in users]
