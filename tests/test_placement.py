"""Stored ``[out, in]`` tensors placed into blocks of fused model weights (``models/placement.py``)."""

import numpy as np
import pytest

from jax_vattention.models.placement import OutIn, Part, Same, check_parts, flat_range, weight_block

D, K, G, H = 6, 4, 3, 2  # model width, KV heads, query heads per KV head, head_dim


def qkv_parts() -> tuple[Part, ...]:
    return (Part("q", OutIn((D,), (K, G, H)), axis=2, at=slice(0, G)),
            Part("k", OutIn((D,), (K, H)), axis=2, at=G),
            Part("v", OutIn((D,), (K, H)), axis=2, at=G + 1))


def stored_qkv() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"q": rng.standard_normal((K * G * H, D)), "k": rng.standard_normal((K * H, D)),
            "v": rng.standard_normal((K * H, D))}


def test_flat_range_is_one_range_or_a_value_error():
    assert flat_range((slice(1, 3), slice(None), slice(None)), (4, 3, 2)) == slice(6, 18)
    assert flat_range((slice(2, 3), slice(1, 2), slice(None)), (4, 3, 2)) == slice(14, 16)
    assert flat_range((slice(None),), (5,)) == slice(0, 5)
    with pytest.raises(ValueError, match="not one range"):
        flat_range((slice(None), slice(0, 1), slice(None)), (4, 3, 2))


def test_a_fused_weight_and_its_shards_are_built_from_the_rows_they_hold():
    stored = stored_qkv()
    shape = (D, K, G + 2, H)
    reads = []

    def read(name, index):
        reads.append((name, index))
        return stored[name][index]

    whole = weight_block(shape, np.float32, qkv_parts(), tuple(slice(0, size) for size in shape), read)
    np.testing.assert_array_equal(whole[:, :, :G], stored["q"].T.reshape(D, K, G, H).astype(np.float32))
    np.testing.assert_array_equal(whole[:, :, G], stored["k"].T.reshape(D, K, H).astype(np.float32))
    np.testing.assert_array_equal(whole[:, :, G + 1], stored["v"].T.reshape(D, K, H).astype(np.float32))
    reads.clear()
    shard = (slice(None), slice(2, 4), slice(None), slice(None))  # the second of two devices
    np.testing.assert_array_equal(weight_block(shape, np.float32, qkv_parts(), shard, read), whole[shard])
    assert reads == [("q", (slice(2 * G * H, 4 * G * H), slice(0, D))),
                     ("k", (slice(2 * H, 4 * H), slice(0, D))), ("v", (slice(2 * H, 4 * H), slice(0, D)))]


def test_a_block_reads_only_the_parts_it_holds():
    f = 5
    gate, up = np.arange(f * D).reshape(f, D), -np.arange(f * D).reshape(f, D)
    parts = (Part("gate", OutIn((D,), (f,)), axis=1, at=0), Part("up", OutIn((D,), (f,)), axis=1, at=1))
    reads = []

    def read(name, index):
        reads.append(name)
        return {"gate": gate, "up": up}[name][index]

    block = weight_block((D, 2, f), np.int64, parts, (slice(None), slice(1, 2), slice(1, 3)), read)
    np.testing.assert_array_equal(block[:, 0], up[1:3].T)
    assert reads == ["up"]


def test_parts_that_do_not_tile_the_weight_are_value_errors():
    check_parts(qkv_parts(), (D, K, G + 2, H), "w_qkv")
    with pytest.raises(ValueError, match="exactly once"):
        check_parts(qkv_parts()[:2], (D, K, G + 2, H), "w_qkv")
    with pytest.raises(ValueError, match="layout has the shape"):
        check_parts(qkv_parts(), (D, K + 1, G + 2, H), "w_qkv")
    with pytest.raises(ValueError, match="one axis"):
        check_parts((Part("embed", Same((3, D))), Part("k", OutIn((D,), (K, H)), axis=2, at=0)), (3, D), "embed")
