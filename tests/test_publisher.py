"""Weight push: safetensors bytes round-trip, versions and checksums, replicas that catch up."""
import numpy as np
import pytest
import ray
import torch
import xxhash
from safetensors.torch import load as safetensors_load

from actors.publisher import (StagingBuffer, WeightPublisher, checksum_of, pack_weights, pack_with_checksum,
                              unpack_weights)
from actors.replica import WeightsOnlyReplicaActor


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_pack_unpack_round_trip_without_pickles():
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16),
               "i64": torch.arange(6).reshape(2, 3), "flag": torch.tensor([True, False]),
               "empty": torch.zeros(0, 7)}
    packed = pack_weights(tensors)
    assert packed.dtype == np.uint8
    back = unpack_weights(packed)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    assert checksum_of(packed) == checksum_of(bytes(packed))
    standard = safetensors_load(bytes(packed))              # a valid safetensors file
    assert all(torch.equal(standard[name], t) for name, t in tensors.items())


def test_checksum_is_xxh3_64_of_every_byte_across_chunks():
    tensors = {"big": torch.randn(700_000),                       # 2.8 MB: several 1 MiB chunks
               "strided": torch.randn(300, 500).t(),              # not contiguous
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "i8": torch.arange(10, dtype=torch.int8)}
    packed, checksum = pack_with_checksum(tensors)
    assert checksum == xxhash.xxh3_64_intdigest(bytes(packed)) == checksum_of(packed)
    assert all(torch.equal(unpack_weights(packed)[name], t) for name, t in tensors.items())
    flipped = packed.copy()
    flipped[len(flipped) // 2] ^= 1
    assert checksum_of(flipped) != checksum


def test_staging_buffer_is_reused_for_one_layout_and_replaced_for_another():
    staging = StagingBuffer()
    state = {"w": torch.randn(400, 1000), "b": torch.randn(1000)}
    first, first_sum = staging.pack(state)
    state["w"] += 1.0
    second, second_sum = staging.pack(state)
    assert second is first and second_sum != first_sum          # same memory, new contents
    assert second_sum == checksum_of(second) and torch.equal(unpack_weights(second)["w"], state["w"])
    third, _ = staging.pack({"w": state["w"][:10], "b": state["b"]})
    assert third is not first and unpack_weights(third)["w"].shape == (10, 1000)
    assert pack_weights(state) is not pack_weights(state)          # the public packers never share memory


@pytest.mark.parametrize("bad, reason", [(b"\x01", "too short"),
                                         (b"\xff" * 8 + b"{}", "exceeds the buffer"),
                                         (b"\x04" + b"\x00" * 7 + b"{{{{", "not JSON"),
                                         (b"\x40" + b"\x00" * 7
                                          + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'.ljust(64)
                                          + b"\x00" * 16, "8 bytes for shape"),
                                         (b"\x40" + b"\x00" * 7
                                          + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.ljust(64)
                                          + b"\x00" * 8, "outside the buffer"),
                                         (b"\x08" + b"\x00" * 7 + b'{"w":1} ', "not an object"),
                                         (b"\x28" + b"\x00" * 7 + b'{"w":{"dtype":"F32","shape":[-1]}}'.ljust(40),
                                          "malformed")])
def test_unpack_rejects_garbage(bad, reason):
    with pytest.raises(ValueError, match=reason):
        unpack_weights(bad)


@pytest.mark.integration
def test_publish_reaches_every_replica_and_late_ones_catch_up(ray_session):
    model = small_model()
    replicas = [WeightsOnlyReplicaActor.options(num_cpus=0.25).remote(small_model) for _ in range(2)]
    late = None
    try:
        publisher = WeightPublisher(replicas)
        for step in range(3):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            weights = publisher.publish(model.state_dict())
            assert weights.version == step + 1
        versions = publisher.wait_applied(timeout_s=60)
        assert set(versions.values()) == {3}           # every replica ends on the latest version
        assert publisher.errors() == []
        assert ray.get([r.version.remote() for r in replicas], timeout=30) == [3, 3]
        assert weights.checksum == checksum_of(ray.get(weights.ref))

        late = WeightsOnlyReplicaActor.options(num_cpus=0.25).remote(small_model)
        publisher.add_replica(late)                    # missed versions 1-3: gets 3 at once
        assert publisher.wait_applied(timeout_s=60)[late._actor_id.hex()] == 3
        assert ray.get(late.version.remote(), timeout=30) == 3

        # a rollback re-serves version 2's bytes as version 4; an observer gets versions but is no replica
        observer = late
        publisher.set_replicas(replicas)
        publisher.add_observer(observer)
        publisher.set_replicas(replicas)               # observers survive set_replicas
        second = publisher.history[2]
        rolled = publisher.republish(2)
        assert rolled.version == 4 and rolled.checksum == second.checksum
        assert set(publisher.wait_applied(timeout_s=60).values()) == {4}
        assert observer._actor_id.hex() not in publisher.replica_versions()
        assert ray.get(observer.version.remote(), timeout=30) == 4
        with pytest.raises(ValueError, match="no longer kept"):
            WeightPublisher(keep_versions=1).republish(1)

        behind = WeightPublisher([replicas[0]])        # a publisher whose versions are not newer
        behind.publish(model.state_dict())
        behind.wait_applied(timeout_s=60)
        assert any("not newer" in e for e in behind.errors())
        assert ray.get(replicas[0].version.remote(), timeout=30) == 4
    finally:
        for r in replicas + ([late] if late is not None else []):
            ray.kill(r)
