"""The k-quant and 5-bit GGUF tensor types against ggml's own dequantization loops.

``reference_dequantize`` below is a line-by-line transcription of ggml's scalar C code
(``dequantize_row_q5_0`` ... ``dequantize_row_q6_K`` in ``ggml-quants.c``): one value at a time,
in the C code's order of operations, from random stored bytes with finite scales. The loader's
``dequantize`` (numpy, through the ``gguf`` package) must give the same float32 values.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF loader needs the gguf package (pip install \".[demo]\")")

from jax_vattention.models import gguf_loader  # noqa: E402

QK_K = 256
# bytes per block, values per block
LAYOUT = {"Q5_0": (22, 32), "Q5_1": (24, 32), "Q4_K": (144, QK_K), "Q5_K": (176, QK_K), "Q6_K": (210, QK_K)}


def _half(raw, offset: int) -> np.float32:
    return np.float32(np.frombuffer(bytes(raw[offset:offset + 2]), np.float16)[0])


def _scale_min_k4(j: int, q) -> tuple[int, int]:
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block ``j`` from 12 packed bytes."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _block(raw, type_name: str) -> list[np.float32]:
    """One block's values, as ggml's C loop computes them (float32 arithmetic)."""
    f = np.float32
    raw = [int(b) for b in raw]
    y = []
    if type_name in ("Q5_0", "Q5_1"):
        d = _half(raw, 0)
        head = 2 if type_name == "Q5_0" else 4
        m = _half(raw, 2) if type_name == "Q5_1" else None
        qh = int.from_bytes(bytes(raw[head:head + 4]), "little")
        qs = raw[head + 4:head + 20]
        y = [f(0)] * 32
        for j in range(16):
            xh_0 = ((qh >> j) << 4) & 0x10
            xh_1 = (qh >> (j + 12)) & 0x10
            x0 = (qs[j] & 0x0F) | xh_0
            x1 = (qs[j] >> 4) | xh_1
            if m is None:
                y[j], y[j + 16] = f(x0 - 16) * d, f(x1 - 16) * d
            else:
                y[j], y[j + 16] = f(x0) * d + m, f(x1) * d + m
        return y
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _half(raw, 0), _half(raw, 2)
        scales = raw[4:16]
        qh = raw[16:48] if type_name == "Q5_K" else None
        ql = raw[48:176] if type_name == "Q5_K" else raw[16:144]
        u1, u2 = 1, 2
        for j in range(0, QK_K, 64):
            sc, m = _scale_min_k4(j // 32, scales)
            d1, m1 = d * f(sc), dmin * f(m)
            sc, m = _scale_min_k4(j // 32 + 1, scales)
            d2, m2 = d * f(sc), dmin * f(m)
            q = ql[j // 2:j // 2 + 32]
            high = [(16 if qh is not None and qh[l] & u1 else 0) for l in range(32)]
            y += [d1 * f((q[l] & 0xF) + high[l]) - m1 for l in range(32)]
            high = [(16 if qh is not None and qh[l] & u2 else 0) for l in range(32)]
            y += [d2 * f((q[l] >> 4) + high[l]) - m2 for l in range(32)]
            u1, u2 = u1 << 2, u2 << 2
        return y
    if type_name == "Q6_K":
        ql, qh = raw[0:128], raw[128:192]
        sc = np.array(raw[192:208], np.uint8).view(np.int8).astype(int).tolist()
        d = _half(raw, 208)
        y = [f(0)] * QK_K
        for n in range(0, QK_K, 128):
            lo, hi, s = ql[n // 2:n // 2 + 64], qh[n // 4:n // 4 + 32], sc[n // 16:n // 16 + 8]
            for l in range(32):
                i = l // 16
                q1 = ((lo[l] & 0xF) | (((hi[l] >> 0) & 3) << 4)) - 32
                q2 = ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32
                q3 = ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32
                q4 = ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32
                y[n + l] = d * f(s[i]) * f(q1)
                y[n + l + 32] = d * f(s[i + 2]) * f(q2)
                y[n + l + 64] = d * f(s[i + 4]) * f(q3)
                y[n + l + 96] = d * f(s[i + 6]) * f(q4)
        return y
    raise AssertionError(type_name)


def reference_dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """float32 [rows, columns] from uint8 [rows, bytes], block by block as ggml's C code."""
    size, _ = LAYOUT[type_name]
    rows = [sum((_block(row[i:i + size], type_name) for i in range(0, len(row), size)), []) for row in raw]
    return np.array(rows, np.float32)


def random_blocks(type_name: str, rows: int, blocks: int, rng) -> np.ndarray:
    """Random stored bytes uint8 [rows, blocks * bytes], every f16 scale finite."""
    size, _ = LAYOUT[type_name]
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    halves = {"Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[type_name]
    for at in halves:
        raw[..., at:at + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.05).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(LAYOUT))
def test_each_new_tensor_type_matches_ggml_scalar_dequantization(type_name):
    assert type_name in gguf_loader.SUPPORTED_TYPES
    raw = random_blocks(type_name, rows=3, blocks=2, rng=np.random.default_rng(1))
    got = gguf_loader.dequantize(raw, type_name)
    want = reference_dequantize(raw, type_name)
    assert got.shape == (3, 2 * LAYOUT[type_name][1]) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) > got.size // 2

