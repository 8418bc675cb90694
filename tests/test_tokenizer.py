"""Semantic-id tokenizer: unique ids, round trips, collisions, new items without refit, persistence."""
import io

import numpy as np
import pytest

from learner.synthetic import random_catalogue
from learner.tokenizer import SemanticTokenizer, kmeans, tokenizer_bytes
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)


@pytest.fixture(scope="module")
def catalogue():
    return random_catalogue(400, codebook_size=8, seed=1)


def test_every_item_gets_a_unique_id_and_round_trips(catalogue):
    item_ids, _, tok = catalogue
    codes = tok.codes_for(item_ids)
    assert codes.shape == (400, 3) and codes.dtype == np.int64
    assert ((codes >= 0) & (codes < 8)).all()
    assert len({tuple(c) for c in codes.tolist()}) == len(item_ids)
    np.testing.assert_array_equal(tok.item_for_code(codes), item_ids)


def test_fit_reports_collisions_and_utilization():
    rng = np.random.default_rng(0)
    # 64 items in 2 tight blobs with a 4x4x4 code space: many raw collisions, all must resolve
    emb = np.concatenate([rng.normal(0, 0.01, (32, 4)), rng.normal(5, 0.01, (32, 4))]).astype(np.float32)
    tok = SemanticTokenizer()
    report = tok.fit(np.arange(64), emb, codebook_sizes=(4, 4, 4))
    assert report.collision_rate > 0.2
    assert len({tuple(c) for c in tok.codes.tolist()}) == 64      # the code space is exactly full
    assert all(0 < u <= 1 for u in report.utilization)
    assert report.as_dict()["n_items"] == 64


def test_collision_moves_to_nearest_free_last_level_code():
    emb = np.zeros((2, 2), dtype=np.float32)   # identical items: the second must move at level 3 only
    tok = SemanticTokenizer()
    tok.fit(np.array([10, 11]), np.concatenate([emb, [[3.0, 3.0]]]).astype(np.float32)[:2], codebook_sizes=(2, 2, 2))
    a, b = tok.codes_for([10, 11])
    assert (a[:2] == b[:2]).all() and a[2] != b[2]


def test_too_many_items_for_code_space_raises():
    with pytest.raises(ValueError, match="item_ids"):
        SemanticTokenizer().fit(np.arange(9), np.zeros((9, 2), np.float32), codebook_sizes=(2, 2, 2))


def test_new_items_get_ids_without_refit(catalogue):
    item_ids, emb, _ = catalogue
    tok = SemanticTokenizer.load(io.BytesIO(tokenizer_bytes(catalogue[2])))
    centroids = [c.clone() for c in tok.centroids]
    old = tok.codes_for(item_ids)
    new_ids = np.array([10**9, 10**9 + 1])
    new_codes = tok.add_items(new_ids, emb[:2] + 0.01)
    assert all((a == b).all() for a, b in zip(centroids, tok.centroids))
    np.testing.assert_array_equal(tok.codes_for(item_ids), old)     # existing ids never change
    assert len({tuple(c) for c in tok.codes.tolist()}) == len(tok)
    np.testing.assert_array_equal(tok.item_for_code(new_codes), new_ids)
    # adding known items again changes nothing
    np.testing.assert_array_equal(tok.add_items(new_ids, emb[:2] + 5.0), new_codes)
    assert len(tok) == len(item_ids) + 2


def test_unknown_items_and_bad_input_raise_naming_the_field(catalogue):
    _, _, tok = catalogue
    with pytest.raises(ValueError, match="item_ids"):
        tok.codes_for([-5, 123456789])
    codes, known = tok.lookup([123456789])
    assert not known[0]
    assert tok.item_for_code([[7, 7, 7]])[0] in (-1, *tok.item_ids.tolist())
    with pytest.raises(ValueError, match="embeddings"):
        SemanticTokenizer().fit(np.arange(3), np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        tok.add_items(np.array([1]), np.zeros((1, 3), np.float32))


def test_save_load_round_trip(tmp_path, catalogue):
    item_ids, _, tok = catalogue
    tok.save(tmp_path / "tok.safetensors")
    back = SemanticTokenizer.load(tmp_path / "tok.safetensors")
    assert back.codebook_sizes == tok.codebook_sizes
    np.testing.assert_array_equal(back.codes_for(item_ids), tok.codes_for(item_ids))
    assert all((a == b).all() for a, b in zip(back.centroids, tok.centroids))


def test_trie_children_match_the_catalogue(catalogue):
    _, _, tok = catalogue
    import torch

    trie = tok.trie()
    codes = torch.from_numpy(tok.codes)
    rows, tokens = trie.children(2, codes[:5, :2])
    for r in range(5):
        expect = sorted(c[2] for c in tok.codes.tolist() if c[:2] == tok.codes[r, :2].tolist())
        assert sorted(tokens[rows == r].tolist()) == expect
    rows, tokens = trie.children(1, codes[:3, :1])
    for r in range(3):
        expect = {c[1] for c in tok.codes.tolist() if c[0] == tok.codes[r, 0]}
        assert sorted(tokens[rows == r].tolist()) == sorted(expect)
    assert trie.contains(codes).all()
    assert (trie.items(codes) == torch.from_numpy(tok.item_ids)).all()


def test_kmeans_finds_separated_clusters():
    import torch

    x = torch.cat([torch.randn(50, 2) * 0.1 + 10, torch.randn(50, 2) * 0.1 - 10])
    c = kmeans(x, 2, seed=0)
    assert sorted(c[:, 0].round().tolist()) == [-10.0, 10.0]
