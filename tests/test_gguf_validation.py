"""Damaged GGUF files, written with the ``gguf`` package: every metadata field range-checked and every
tensor checked against the metadata and the file before a model is built; each error names the file
and the field (and, for a cached download, says to delete it)."""

import os
import time
import types

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF loader needs the gguf package (pip install \".[demo]\")")

from jax_vattention.models import gguf_loader, hf_loader  # noqa: E402
from jax_vattention.models.gguf_validation import check_tensors, expected_shapes  # noqa: E402

D, F, V, LAYERS, HEADS, KV_HEADS = 64, 128, 256, 2, 4, 2


def write_gguf(path, meta_changes=None, shapes_changes=None, drop=()):
    """A small llama GGUF file (float32 tensors, a byte-level vocabulary) with ``meta_changes``
    (key -> value, None to leave a key out), tensors reshaped by ``shapes_changes`` and ``drop``
    left out."""
    meta = {"llama.block_count": LAYERS, "llama.embedding_length": D, "llama.feed_forward_length": F,
            "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 512,
            "llama.vocab_size": V, "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    meta.update(meta_changes or {})
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "ab"] + [f"<t{i}>" for i in range(5, V)])
    writer.add_array("tokenizer.ggml.merges", ["a b"])
    writer.add_array("tokenizer.ggml.token_type", [3, 3] + [1] * (V - 2))
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D)}
    for i in range(LAYERS):
        q, kv = D, KV_HEADS * D // HEADS
        shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
                       f"blk.{i}.attn_q.weight": (q, D), f"blk.{i}.attn_k.weight": (kv, D),
                       f"blk.{i}.attn_v.weight": (kv, D), f"blk.{i}.attn_output.weight": (D, q),
                       f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                       f"blk.{i}.ffn_down.weight": (D, F)})
    shapes.update(shapes_changes or {})
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name not in drop:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(autouse=True)
def nothing_is_built(monkeypatch):
    """A refused file never reaches the model's construction."""
    monkeypatch.setattr(hf_loader, "load_tensors", lambda *a, **k: pytest.fail("a model was built"))


def refused(path, match, load=gguf_loader.load):
    with pytest.raises(ValueError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") or message.startswith(f"{path} "), message
    assert match in message, message
    return message


def test_a_valid_file_passes_every_check(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "ok.gguf")
    built = []
    monkeypatch.setattr(hf_loader, "load_tensors", lambda config, tensors, source: built.append(tensors) or "model")
    model, tokenizer = gguf_loader.load(path)
    assert model == "model" and len(built[0]) == 3 + 9 * LAYERS and tokenizer.encode("ab").ids == [4]
    assert gguf_loader.read_config(path).num_layers == LAYERS


@pytest.mark.parametrize("changes, match", [
    ({"llama.attention.head_count": 0}, "the GGUF field llama.attention.head_count is 0: it must be at least 1"),
    ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv is 0: it must be at least 1"),
    ({"llama.attention.head_count_kv": 3}, "llama.attention.head_count_kv is 3: it must divide"),
    ({"llama.attention.head_count": 5, "llama.attention.head_count_kv": 5},
     "llama.attention.head_count is 5: without llama.attention.key_length it must divide"),
    ({"llama.embedding_length": 0}, "llama.embedding_length is 0"),
    ({"llama.feed_forward_length": None}, "lacks the metadata field 'llama.feed_forward_length'"),
    ({"llama.context_length": 0}, "llama.context_length is 0"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon is 0.0: it must be in (0.0, 1.0)"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, "a finite number is expected"),
    ({"llama.rope.freq_base": -1.0}, "llama.rope.freq_base is -1.0"),
    ({"llama.vocab_size": 300}, "llama.vocab_size is 300 but tokenizer.ggml.tokens holds 256 tokens"),
    ({"tokenizer.ggml.bos_token_id": 9999}, "tokenizer.ggml.bos_token_id is 9999: it must be between 0 and 255"),
    ({"tokenizer.ggml.eos_token_id": 256}, "tokenizer.ggml.eos_token_id is 256: it must be between 0 and 255"),
    ({"llama.block_count": 0}, "llama.block_count is 0: it must be between 1 and 1024"),
    ({"llama.block_count": 5}, "llama.block_count is 5 but the file's tensors are those of 2 blocks"),
])
def test_each_metadata_field_is_range_checked(tmp_path, changes, match):
    refused(write_gguf(tmp_path / "bad.gguf", changes), match)


def test_an_absurd_block_count_is_refused_at_once(tmp_path):
    path = write_gguf(tmp_path / "huge.gguf", {"llama.block_count": 2**32 - 1})
    start = time.perf_counter()
    refused(path, "llama.block_count is 4294967295: it must be between 1 and 1024", load=gguf_loader.read_config)
    refused(path, "llama.block_count is 4294967295", load=gguf_loader.load_model)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("shapes, drop, match", [
    ({"blk.1.attn_q.weight": (32, D)}, (), "the GGUF tensor blk.1.attn_q.weight has shape (32, 64); the metadata "
                                           "implies (64, 64)"),
    ({"token_embd.weight": (V - 1, D)}, (), "token_embd.weight has shape (255, 64)"),
    ({}, ("blk.1.ffn_down.weight",), "lacks the tensor blk.1.ffn_down.weight"),
])
def test_tensors_are_checked_against_the_metadata(tmp_path, shapes, drop, match):
    refused(write_gguf(tmp_path / "bad.gguf", shapes_changes=shapes, drop=drop), match)


def test_a_truncated_file_is_named(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf")
    data = open(whole, "rb").read()
    for keep in (len(data) - 100, len(data) // 2, 200):
        path = tmp_path / f"cut{keep}.gguf"
        path.write_bytes(data[:keep])
        message = refused(str(path), "is not a readable GGUF file: it is truncated or corrupted")
        assert "delete" not in message


def test_a_tensor_past_the_files_end_is_named():
    config = gguf_loader.config_from_gguf({"general.architecture": "llama", "llama.block_count": 1,
                                           "llama.embedding_length": D, "llama.feed_forward_length": F,
                                           "llama.attention.head_count": HEADS, "llama.context_length": 64,
                                           "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": V},
                                          set())
    tensors, offset = [], 0
    for name, shape in expected_shapes(config).items():
        tensors.append(types.SimpleNamespace(name=name, shape=tuple(reversed(shape)), data_offset=offset,
                                             n_bytes=4 * int(np.prod(shape))))
        offset += tensors[-1].n_bytes
    last = tensors[-1]
    with pytest.raises(ValueError, match=f"the GGUF tensor {last.name} ends at byte .* past the file's end"):
        check_tensors(tensors, config, file_bytes=last.data_offset + last.n_bytes - 1)
    check_tensors(tensors, config, file_bytes=last.data_offset + last.n_bytes)


def test_a_bad_cached_download_says_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_VATTENTION_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    path = write_gguf(tmp_path / "cache" / "model.gguf", {"tokenizer.ggml.bos_token_id": 9999})
    message = refused(path, "bos_token_id is 9999")
    assert f"it is a cached download: delete {path} and run again to fetch it anew" in message
    cut = tmp_path / "cache" / "cut.gguf"
    cut.write_bytes(open(path, "rb").read()[:500])
    assert "delete" in refused(str(cut), "truncated or corrupted")
