"""User-context featurization: validation names the field, truncation keeps the newest items."""
import copy

import numpy as np
import pytest
import torch

from learner.config import ModelConfig
from dataclasses import fields

from hypothesis import given, settings
from hypothesis import strategies as st

from learner.features import _columns_vectorized, build_context_batch, build_context_batch_reference
from learner.synthetic import random_catalogue, random_context
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(codebook_size=8, max_short=4, max_long=6, item_hash_buckets=512)


@pytest.fixture(scope="module")
def catalogue():
    return random_catalogue(50, codebook_size=8, seed=4)


def test_shapes_padding_and_truncation(catalogue):
    item_ids, _, tok = catalogue
    rng = np.random.default_rng(0)
    a = random_context(rng, CFG, item_ids, n_short=7, n_long=0)   # more short items than max_short
    b = random_context(rng, CFG, item_ids, n_short=2, n_long=3)
    batch = build_context_batch([a, b], tok, CFG)
    assert batch.profile.shape == (2, CFG.profile_fields)
    assert batch.mask.shape == (2, 4 + 3) and batch.semantic_ids.shape == (2, 7, 3)
    assert batch.mask[0].tolist() == [True] * 4 + [False] * 3
    assert batch.mask[1].tolist() == [True, True, False, False, True, True, True]
    assert batch.segment[0].tolist() == [0] * 4 + [1] * 3
    newest = np.asarray(a["short"]["item_id"][-4:]) % CFG.item_hash_buckets
    assert batch.item_hash[0, :4].tolist() == newest.tolist()
    np.testing.assert_array_equal(batch.semantic_ids[1, :2].numpy(), tok.codes_for(b["short"]["item_id"]))
    assert len(batch) == 2 and batch.n_tokens == CFG.profile_fields + 7
    assert len(batch.index_select([1, 1, 0])) == 3


def test_unknown_items_get_the_unknown_code(catalogue):
    item_ids, _, tok = catalogue
    ctx = random_context(np.random.default_rng(0), CFG, item_ids, n_short=2, n_long=0)
    ctx["short"]["item_id"][0] = 10**9
    batch = build_context_batch([ctx], tok, CFG)
    assert batch.semantic_ids[0, 0].tolist() == [CFG.codebook_size] * 3
    batch.check(CFG)


@pytest.mark.parametrize("path,value,field", [
    (("profile",), [1, 2], "profile"),
    (("profile", 0), 64, "profile[0]"),
    (("short", "flags", 0), 128, "short.flags[0]"),
    (("short", "duration_s", 0), float("nan"), "short.duration_s[0]"),
    (("long", "play_time_s", 0), -1.0, "long.play_time_s[0]"),
    (("short", "item_id", 0), -3, "short.item_id[0]"),
    (("short", "item_id"), [1], "short"),
    (("long",), None, "long"),
])
def test_bad_context_names_the_field(catalogue, path, value, field):
    item_ids, _, tok = catalogue
    ctx = random_context(np.random.default_rng(0), CFG, item_ids, n_short=3, n_long=2)
    bad = copy.deepcopy(ctx)
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=f"contexts\\[1\\].{field}".replace("[0]", "\\[0\\]")):
        build_context_batch([ctx, bad], tok, CFG)


def test_empty_context_raises(catalogue):
    _, _, tok = catalogue
    cfg = CFG.replace(profile_fields=0)
    empty = {"profile": [], "short": {k: [] for k in ("item_id", "duration_s", "play_time_s", "flags")},
             "long": {k: [] for k in ("item_id", "duration_s", "play_time_s", "flags")}}
    with pytest.raises(ValueError, match="empty context"):
        build_context_batch([empty], tok, cfg)
    with pytest.raises(ValueError, match="contexts"):
        build_context_batch([], tok, cfg)


def test_check_rejects_tensor_mismatches(catalogue):
    item_ids, _, tok = catalogue
    batch = build_context_batch([random_context(np.random.default_rng(0), CFG, item_ids)], tok, CFG)
    batch.duration_bucket = batch.duration_bucket[:, :-1]
    with pytest.raises(ValueError, match="duration_bucket"):
        batch.check(CFG)
    batch = build_context_batch([random_context(np.random.default_rng(0), CFG, item_ids)], tok, CFG)
    batch.mask = batch.mask.long()
    with pytest.raises(ValueError, match="mask"):
        batch.check(CFG)
    batch = build_context_batch([random_context(np.random.default_rng(0), CFG, item_ids)], tok, CFG)
    batch.item_hash = batch.item_hash + CFG.item_hash_buckets
    with pytest.raises(ValueError, match="item_hash"):
        batch.check(CFG)
    assert isinstance(batch.to("cpu").profile, torch.Tensor)


def assert_batches_equal(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and torch.equal(x, y), f.name


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), max_short=st.integers(1, 5), max_long=st.integers(0, 6), profile_fields=st.integers(0, 3),
       unknown=st.booleans(), numpy_ints=st.booleans(), seed=st.integers(0, 10_000))
def test_vectorized_featurizer_equals_the_per_sample_reference(catalogue, b, max_short, max_long, profile_fields,
                                                               unknown, numpy_ints, seed):
    """Random lengths (some over the limits: truncation), items unknown to the tokenizer, numpy ints."""
    item_ids, _, tok = catalogue
    cfg = CFG.replace(max_short=max_short, max_long=max_long, profile_fields=profile_fields)
    rng = np.random.default_rng(seed)
    contexts = [random_context(rng, cfg, item_ids, n_short=int(rng.integers(1, max_short + 3)),
                               n_long=int(rng.integers(0, max_long + 3))) for _ in range(b)]
    if unknown:
        contexts[0]["short"]["item_id"][-1] = 10**9
    if numpy_ints:
        contexts[-1]["short"]["item_id"] = [np.int64(v) for v in contexts[-1]["short"]["item_id"]]
        contexts[-1]["long"]["duration_s"] = [int(v) for v in contexts[-1]["long"]["duration_s"]]
    assert _columns_vectorized(contexts, cfg) is not None                      # the fast path took them
    assert_batches_equal(build_context_batch(contexts, tok, cfg), build_context_batch_reference(contexts, tok, cfg))


def test_bad_value_in_a_dropped_old_item_is_ignored_as_by_the_reference(catalogue):
    item_ids, _, tok = catalogue
    ctx = random_context(np.random.default_rng(1), CFG, item_ids, n_short=CFG.max_short + 2, n_long=2)
    ctx["short"]["flags"][0] = 999                                             # dropped by truncation
    assert _columns_vectorized([ctx], CFG) is not None                         # ranges: kept items only
    assert_batches_equal(build_context_batch([ctx], tok, CFG), build_context_batch_reference([ctx], tok, CFG))


@pytest.mark.parametrize("value", [True, 2.0, "3", None])
def test_non_int_item_ids_leave_the_fast_path_and_name_the_field(catalogue, value):
    item_ids, _, tok = catalogue
    ctx = random_context(np.random.default_rng(2), CFG, item_ids, n_short=3, n_long=1)
    ctx["long"]["item_id"][0] = value
    assert _columns_vectorized([ctx], CFG) is None
    with pytest.raises(ValueError, match=r"contexts\[0\]\.long\.item_id\[0\]"):
        build_context_batch([ctx], tok, CFG)
