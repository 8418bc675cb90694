"""Serving replicas: versions only go forward, checksums are checked, swaps are atomic under load,
CPU replicas serve views of the published buffer and release it with the last request on it."""
import threading
import weakref

import numpy as np
import pytest
import ray
import torch

from actors.publisher import checksum_of, pack_weights, unpack_weights
from actors.replica import ReplicaActor, ServingReplica
from learner.model import LazyDecoder
from simulator.users import UserSimulator
from tests.loop_helpers import loop_config, tokenizer, tokenizer_blob


def weights_for(cfg, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return LazyDecoder(cfg.model).state_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = loop_config(tmp_path_factory.mktemp("replica"))
    sim = UserSimulator.default(seed=0)
    contexts = [sim.context(int(u)) for u in sim.user_ids[:3]]
    return cfg, tokenizer(cfg.model.codebook_size), contexts


def make_replica(cfg, tok, seed=0):
    torch.manual_seed(seed)
    return ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, version=0)


def test_recommend_returns_items_logprobs_and_version(setup):
    cfg, tok, contexts = setup
    replica = make_replica(cfg, tok)
    out = replica.recommend(contexts, top_k=4, beam_width=8)
    assert out["model_version"] == 0
    assert len(out["item_ids"]) == 3 and all(len(row) == 4 for row in out["item_ids"])
    assert all(len(set(row)) == 4 for row in out["item_ids"])            # distinct items per request
    assert all(lp <= 0 for row in out["logprobs"] for lp in row)
    codes = tok.codes_for([i for row in out["item_ids"] for i in row]).tolist()
    assert codes == [s for row in out["semantic_ids"] for s in row]      # ids match the tokenizer


def test_apply_rejects_old_versions_and_bad_checksums_loudly(setup):
    cfg, tok, contexts = setup
    replica = make_replica(cfg, tok)
    packed = pack_weights(weights_for(cfg, 1))
    assert replica.apply_weights(3, packed, checksum_of(packed)) == 3
    with pytest.raises(ValueError, match="not newer"):
        replica.apply_weights(3, packed, checksum_of(packed))
    with pytest.raises(ValueError, match="not newer"):
        replica.apply_weights(2, packed, checksum_of(packed))
    corrupted = packed.copy()
    corrupted[-1] ^= 0xFF
    with pytest.raises(ValueError, match="checksum mismatch"):
        replica.apply_weights(4, corrupted, checksum_of(packed))
    assert replica.version == 3
    # a replica that missed versions 4..9 catches up directly to 10
    packed10 = pack_weights(weights_for(cfg, 10))
    assert replica.apply_weights(10, packed10, checksum_of(packed10)) == 10
    assert replica.recommend(contexts[:1], top_k=2, beam_width=4)["model_version"] == 10


def test_swap_is_atomic_under_concurrent_requests(setup):
    """Every answer equals, bit for bit, what the full model of the version it names gives."""
    cfg, tok, contexts = setup
    context = contexts[:1]
    expected = {}
    for version in range(0, 9):
        reference = ServingReplica(_model_with(cfg, weights_for(cfg, version)), tokenizer=tok, model_cfg=cfg.model)
        expected[version] = reference.recommend(context, top_k=4, beam_width=8)
    replica = ServingReplica(_model_with(cfg, weights_for(cfg, 0)), tokenizer=tok, model_cfg=cfg.model)
    answers, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            answers.append(replica.recommend(context, top_k=4, beam_width=8))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 9):
            packed = pack_weights(weights_for(cfg, version))
            replica.apply_weights(version, packed, checksum_of(packed))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    seen_versions = {a["model_version"] for a in answers}
    assert len(seen_versions) >= 2, "traffic should have overlapped at least one swap"
    for answer in answers:
        want = expected[answer["model_version"]]
        assert answer["item_ids"] == want["item_ids"]
        assert answer["logprobs"][0] == pytest.approx(want["logprobs"][0], abs=1e-5)
    versions_in_order = [a["model_version"] for a in answers]
    assert replica.version == 8 and max(versions_in_order) <= 8


def _model_with(cfg, state):
    model = LazyDecoder(cfg.model)
    model.load_state_dict(state)
    return model


def test_zero_copy_serves_views_of_the_buffer_with_the_copying_replicas_answers(setup):
    cfg, tok, contexts = setup
    viewing = make_replica(cfg, tok)
    copying = ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, zero_copy=False)
    assert viewing.zero_copy and not copying.zero_copy
    for version in (1, 2):
        packed = pack_weights(weights_for(cfg, version))
        viewing.apply_weights(version, packed, checksum_of(packed))
        copying.apply_weights(version, packed, checksum_of(packed))
        start, end = packed.ctypes.data, packed.ctypes.data + packed.nbytes
        params = list(viewing._active.model.parameters())
        assert params and all(start <= p.data_ptr() < end for p in params)           # views, no copy
        assert not any(start <= p.data_ptr() < end for p in copying._active.model.parameters())
        assert viewing.recommend(contexts, top_k=4, beam_width=8) == copying.recommend(contexts, top_k=4, beam_width=8)


def test_weights_that_do_not_fit_are_refused_before_serving(setup):
    cfg, tok, contexts = setup
    for zero_copy in (True, False):
        replica = ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, zero_copy=zero_copy)
        before = replica.recommend(contexts[:1], top_k=2, beam_width=4)
        state = weights_for(cfg, 1)
        name = next(iter(state))
        for bad, reason in [({**state, name: state[name][:1]}, name),                 # wrong shape
                            ({**state, name: state[name].double()}, name),            # wrong dtype
                            ({k: v for k, v in state.items() if k != name}, "missing"),
                            ({**state, "extra": torch.zeros(2)}, "unexpected")]:
            packed = pack_weights(bad)
            with pytest.raises(ValueError, match=reason):
                replica.apply_weights(2, packed, checksum_of(packed))
        packed = pack_weights(state)
        garbage = packed.copy()
        garbage[8:16] = ord("#")                                                      # header no longer JSON
        with pytest.raises(ValueError, match="checksum mismatch"):
            replica.apply_weights(2, garbage, checksum_of(packed))
        with pytest.raises(ValueError, match="not JSON"):
            replica.apply_weights(2, garbage, checksum_of(garbage))
        assert replica.version == 0
        assert replica.recommend(contexts[:1], top_k=2, beam_width=4) == before


def test_request_during_a_swap_finishes_on_its_version_then_its_buffer_is_released(setup):
    cfg, tok, contexts = setup
    replica = make_replica(cfg, tok)
    packed1, packed2 = pack_weights(weights_for(cfg, 1)), pack_weights(weights_for(cfg, 2))
    replica.apply_weights(1, packed1, checksum_of(packed1))
    expected1 = replica.recommend(contexts[:1], top_k=4, beam_width=8)
    entered, resume = threading.Event(), threading.Event()

    def hold(module, args):       # the request pauses inside version 1's model
        entered.set()
        assert resume.wait(timeout=30)

    handle = replica._active.model.blocks[0].register_forward_pre_hook(hold)
    answers = []
    request = threading.Thread(target=lambda: answers.append(replica.recommend(contexts[:1], top_k=4, beam_width=8)))
    request.start()
    try:
        assert entered.wait(timeout=30)
        released = weakref.ref(packed1)
        del packed1
        replica.apply_weights(2, packed2, checksum_of(packed2))         # swaps while the request runs
        assert replica.version == 2
        assert released() is not None, "version 1's buffer must live while a request uses it"
    finally:
        resume.set()
        request.join(timeout=30)
    handle.remove()
    assert answers == [expected1]                                      # finished on version 1, bit for bit
    del answers, expected1, handle
    assert released() is None, "version 1's buffer must be released after its last request"
    assert replica.recommend(contexts[:1], top_k=4, beam_width=8)["model_version"] == 2


def test_views_are_read_only_and_serving_does_not_write_them(setup):
    cfg, tok, contexts = setup
    replica = make_replica(cfg, tok)
    packed = pack_weights(weights_for(cfg, 1))
    packed.flags.writeable = False                          # as Ray hands out object-store arrays
    checksum = checksum_of(packed)
    replica.apply_weights(1, packed, checksum)
    replica.recommend(contexts, top_k=4, beam_width=8, temperature=1.0)
    assert checksum_of(packed) == checksum
    assert all(torch.equal(a, b) for a, b in zip(replica._active.model.state_dict().values(),
                                                  unpack_weights(packed).values()))


@pytest.mark.integration
def test_replica_actor_serves_and_swaps(ray_session, setup):
    cfg, tok, contexts = setup
    packed = pack_weights(weights_for(cfg, 1))
    ref = ray.put(packed)
    actor = ReplicaActor.options(num_cpus=0.5).remote(cfg.model, tokenizer_blob(cfg.model.codebook_size),
                                                      1, ref, checksum_of(packed))
    try:
        out = ray.get(actor.recommend.remote(contexts[:2], 3, 6), timeout=120)
        assert out["model_version"] == 1 and len(out["item_ids"][0]) == 3
        packed2 = pack_weights(weights_for(cfg, 2))
        assert ray.get(actor.apply_weights.remote(2, ray.put(packed2), checksum_of(packed2)), timeout=60) == 2
        with pytest.raises(ValueError, match="not newer"):
            ray.get(actor.apply_weights.remote(2, ray.put(packed2), checksum_of(packed2)), timeout=60)
        assert ray.get(actor.recommend.remote(contexts[:1], 3, 6), timeout=60)["model_version"] == 2
        corrupted = pack_weights(weights_for(cfg, 3))
        checksum = checksum_of(corrupted)
        corrupted[-1] ^= 0xFF
        with pytest.raises(ValueError, match="checksum mismatch"):
            ray.get(actor.apply_weights.remote(3, ray.put(corrupted), checksum), timeout=60)
        health = ray.get(actor.health.remote(), timeout=60)
        assert health["version"] == 2 and health["zero_copy"]    # serves object-store views on the CPU
    finally:
        ray.kill(actor)


def test_sampled_serving_explores_beyond_the_greedy_top_k(setup):
    cfg, tok, contexts = setup
    replica = make_replica(cfg, tok)
    greedy = {tuple(replica.recommend(contexts[:1], top_k=2, beam_width=16)["item_ids"][0]) for _ in range(5)}
    assert len(greedy) == 1                                               # deterministic
    sampled = [replica.recommend(contexts[:1], top_k=2, beam_width=16, temperature=1.0) for _ in range(30)]
    shown = {i for out in sampled for i in out["item_ids"][0]}
    assert len(shown) > 2                                                 # draws vary across requests
    for out in sampled:
        codes = tok.codes_for(out["item_ids"][0]).tolist()
        assert codes == out["semantic_ids"][0] and len(set(out["item_ids"][0])) == 2


# ---- quantized serving (serve.dtype) ----------------------------------------------------------------
def agreement(reference: list[list[int]], other: list[list[int]], k: int) -> tuple[float, float]:
    """(top-k overlap with the reference's top-k, recall of the reference's top-k in other's whole list)."""
    overlap = [len(set(a[:k]) & set(b[:k])) / k for a, b in zip(reference, other)]
    recall = [len(set(a[:k]) & set(b)) / k for a, b in zip(reference, other)]
    return float(np.mean(overlap)), float(np.mean(recall))


@pytest.fixture(scope="module")
def probe_users(setup):
    from simulator import embedded

    cfg, tok, _ = setup
    return embedded.probe_contexts(cfg.model)


def served_lists(cfg, tok, contexts, dtype: str, packed, *, device: str = "cpu", beam: int = 32):
    torch.manual_seed(0)
    replica = ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, version=0, device=device,
                             dtype=dtype)
    replica.apply_weights(1, packed, checksum_of(packed))
    out = replica.recommend(contexts, top_k=beam, beam_width=beam)     # the whole beam, best first
    return replica, out["item_ids"]


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_quantized_replica_agrees_with_fp32_on_probe_users(setup, probe_users, dtype):
    """Every pushed version is converted before the swap (counted in last_apply_s); its top-10 on the
    probe users agrees with fp32's on the same weights."""
    from learner.quant import QuantizedLinear

    cfg, tok, _ = setup
    packed = pack_weights(weights_for(cfg, 4))
    before = packed.copy()
    _, reference = served_lists(cfg, tok, probe_users, "fp32", packed)
    replica, lists = served_lists(cfg, tok, probe_users, dtype, packed)
    overlap, recall = agreement(reference, lists, k=10)
    assert overlap >= 0.9 and recall >= 0.95, (overlap, recall)
    model = replica._active.model
    if dtype == "int8":
        assert any(isinstance(m, QuantizedLinear) and m.mode == "int8_dynamic" for m in model.modules())
    else:
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    health = replica.health()
    assert health["dtype"] == dtype and not health["zero_copy"] and health["last_apply_s"] > 0
    assert (packed == before).all()                        # the published buffer is only read
    packed2 = pack_weights(weights_for(cfg, 5))
    replica.apply_weights(2, packed2, checksum_of(packed2))
    assert replica.recommend(probe_users[:1], top_k=3, beam_width=8)["model_version"] == 2
    model2 = replica._active.model
    assert model2 is not model and (dtype != "int8" or any(isinstance(m, QuantizedLinear) for m in model2.modules()))


def test_serve_dtype_is_validated_and_fp8_needs_a_gpu(setup):
    from learner.quant import SERVING_DTYPES, serving_dtype_support
    from serving_bridge.config import SERVE_DTYPES, ServeConfig

    cfg, tok, _ = setup
    assert SERVE_DTYPES == SERVING_DTYPES
    with pytest.raises(ValueError, match="serve.dtype"):
        ServeConfig(dtype="int4")
    with pytest.raises(ValueError, match="dtype"):
        ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, dtype="float16")
    with pytest.raises(ValueError, match="fp8 serves on CUDA only"):
        ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, dtype="fp8")
    with pytest.raises(ValueError, match="zero_copy"):
        ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, dtype="int8", zero_copy=True)
    fast, kind = serving_dtype_support("fp32")
    assert fast and kind.startswith("cpu ")


def test_slow_dtype_on_this_cpu_still_serves_and_says_so(setup, caplog):
    from learner.quant import serving_dtype_support

    cfg, tok, contexts = setup
    fast, _ = serving_dtype_support("bf16")
    with caplog.at_level("WARNING", logger="actors.replica"):
        replica = ServingReplica(LazyDecoder(cfg.model), tokenizer=tok, model_cfg=cfg.model, dtype="bf16")
    assert ("slow here" in caplog.text) == (not fast)
    assert len(replica.recommend(contexts[:1], top_k=2, beam_width=4)["item_ids"][0]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_gpu_replica_serves_bf16_and_fp8_in_agreement_with_fp32(setup, probe_users, dtype):
    cfg, tok, _ = setup
    packed = pack_weights(weights_for(cfg, 4))
    _, reference = served_lists(cfg, tok, probe_users, "fp32", packed)          # on the CPU
    replica, lists = served_lists(cfg, tok, probe_users, dtype, packed, device="cuda")
    overlap, recall = agreement(reference, lists, k=10)
    assert overlap >= 0.8 and recall >= 0.9, (overlap, recall)
    assert replica.health()["dtype"] == dtype and replica.last_apply_s > 0


@pytest.mark.integration
def test_replica_actor_serves_int8(ray_session, setup):
    cfg, tok, contexts = setup
    packed = pack_weights(weights_for(cfg, 1))
    actor = ReplicaActor.options(num_cpus=0.5).remote(cfg.model, tokenizer_blob(cfg.model.codebook_size),
                                                      1, ray.put(packed), checksum_of(packed), dtype="int8")
    try:
        assert ray.get(actor.recommend.remote(contexts[:1], 3, 6), timeout=120)["model_version"] == 1
        health = ray.get(actor.health.remote(), timeout=60)
        assert health["dtype"] == "int8" and not health["zero_copy"]
    finally:
        ray.kill(actor)
