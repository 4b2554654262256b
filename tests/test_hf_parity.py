"""Our loader and model against Hugging Face ``transformers`` on tiny random checkpoints."""

import json
import os

import numpy as np
import pytest

PARITY = "the transformers parity tests need the parity extra: pip install '.[parity]' (a CPU torch first, see README)"
torch = pytest.importorskip("torch", reason=PARITY)
transformers = pytest.importorskip("transformers", reason=PARITY)

import jax.numpy as jnp  # noqa: E402

from jax_vattention.cache.kv_cache import KVCache  # noqa: E402
from jax_vattention.decode.generate import generate  # noqa: E402
from jax_vattention.models.hf_loader import load_model, load_tokenizer  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def save_tiny_llama(directory, *, tie=False, dtype=torch.float32, shard=False, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, initializer_range=0.3, tie_word_embeddings=tie, rope_scaling=LLAMA3_ROPE,
        **overrides)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB" if shard else "1GB")
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


@pytest.mark.parametrize("tie,shard", [(False, False), (True, True)])
def test_logits_and_greedy_generations_match_transformers(tmp_path, tie, shard):
    hf = save_tiny_llama(tmp_path, tie=tie, shard=shard)
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == shard
    model = load_model(str(tmp_path))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (3, 11, 6)]
    max_new = 8
    cache = KVCache.dense(num_layers=2, max_batch=4, capacity=64, kv_heads=2, head_dim=8, dtype=jnp.float32)
    result, cache = generate(model, cache, prompts, max_new_tokens=max_new, return_logits=True)
    for prompt, tokens, logits in zip(prompts, result.tokens, result.logits):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == want
        full = hf_logits(hf, prompt + tokens[:-1])  # the logits each new token was drawn from
        np.testing.assert_allclose(logits, full[len(prompt) - 1:], atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads_and_casts(tmp_path):
    hf = save_tiny_llama(tmp_path, dtype=torch.bfloat16)
    assert load_model(str(tmp_path)).embed[...].dtype == jnp.bfloat16
    model = load_model(str(tmp_path), dtype="float32")
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.w_down[...]),
                                  hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T)


def test_tokenizer_json_is_loaded(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    save_tiny_llama(tmp_path)
    assert load_tokenizer(str(tmp_path)) is None
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path)).encode("hello world").ids == [1, 2]


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"attention_bias": True}, "lacks the tensor model.layers.0.self_attn.k_proj.bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "rope_theta": 10000.0}},
     "rope type 'proportional'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"model_type": "gemma3"}, "image-and-text"),
    ({"num_key_value_heads": 3}, "k_proj"),
    ({"intermediate_size": 81}, "gate_proj.weight has shape"),
])
def test_unsupported_or_inconsistent_checkpoints_are_value_errors(tmp_path, changes, message):
    save_tiny_llama(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_model(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    save_tiny_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks the tensor model.layers.1.mlp.up_proj.weight"):
        load_model(str(tmp_path))


def test_generate_command_runs_a_checkpoint_with_its_tokenizer(tmp_path, capsys):
    import argparse

    import tokenizers

    from jax_vattention.app.commands import generate as command
    save_tiny_llama(tmp_path)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 5, "world": 9},
                                                                 unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--prompt", "hello world hello", "--batch", "1",
                              "--max-new-tokens", "5", "--max-len", "64", "--rounds", "1"])
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path}" in out and "[0] 3 prompt tokens ->" in out and "tokens/s" in out


@pytest.mark.parametrize("theta,head_dim,rope", [
    (500_000.0, 128, LLAMA3_ROPE | {"original_max_position_embeddings": 8192}),  # Llama 3.1
    (500_000.0, 64, LLAMA3_ROPE | {"factor": 32.0, "original_max_position_embeddings": 8192}),  # Llama 3.2
    (500_000.0, 128, None),  # Llama 3
    (5_000_000.0, 128, None),  # Yi
    (1_000_000.0, 128, None),  # Mistral v0.2
    (10_000.0, 128, None),  # Llama 2
    (100_000.0, 64, None),  # SmolLM2
    (10_000.0, 128, {"rope_type": "linear", "factor": 4.0}),
])
def test_rope_frequencies_within_one_ulp_of_transformers(theta, head_dim, rope):
    from jax_vattention.models.hf_loader import config_from_hf
    from jax_vattention.models.rope import inverse_frequencies
    hf_config = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta, **(rope or {"rope_type": "default"})})
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).inv_freq.numpy()
    ours = inverse_frequencies(config_from_hf(hf_config.to_dict()))
    assert ours.dtype == np.float32
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1 and (ulps > 0).sum() <= 1


def test_logits_match_transformers_past_position_2000_with_llama3_rope(tmp_path):
    """Real rope parameters (theta 500000, llama3 scaling, 64 frequencies) and GQA 7:1: an angle
    error grows with the position, so this is where imprecise frequencies show."""
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=70, intermediate_size=96, num_hidden_layers=2, num_attention_heads=7,
        num_key_value_heads=1, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        initializer_range=0.3, rope_parameters=rope)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    tokens = np.random.default_rng(1).integers(0, 97, size=2080).tolist()
    cache = KVCache.dense(num_layers=2, max_batch=1, capacity=2080, kv_heads=1, head_dim=128,
                          dtype=jnp.float32)
    logits, _ = model(jnp.asarray([tokens], jnp.int32), jnp.arange(2080, dtype=jnp.int32)[None], cache,
                      start=jnp.zeros(1, jnp.int32), count=jnp.full(1, 2080, jnp.int32))
    want = hf_logits(hf, tokens)
    np.testing.assert_allclose(np.asarray(logits)[0, 2000:], want[2000:], atol=1e-4, rtol=1e-4)


def test_tied_checkpoint_with_its_own_head_uses_it_as_transformers_does(tmp_path):
    from safetensors.torch import load_file, save_file
    save_tiny_llama(tmp_path, tie=True)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = torch.randn(97, 48, generator=torch.Generator().manual_seed(5)) * 0.3
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert torch.equal(hf.lm_head.weight, tensors["lm_head.weight"])  # transformers 5 does not tie it
    model = load_model(str(tmp_path))
    assert not model.config.tie_embeddings
    tokens = [5, 17, 3, 88, 41]
    cache = KVCache.dense(num_layers=2, max_batch=1, capacity=16, kv_heads=2, head_dim=8, dtype=jnp.float32)
    logits, _ = model(jnp.asarray([tokens], jnp.int32), jnp.arange(5, dtype=jnp.int32)[None], cache,
                      start=jnp.zeros(1, jnp.int32), count=jnp.full(1, 5, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits)[0], hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_tied_checkpoint_storing_the_embedding_as_head_stays_tied(tmp_path):
    from safetensors.torch import load_file, save_file
    save_tiny_llama(tmp_path, tie=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(str(tmp_path))
    assert model.config.tie_embeddings and model.lm_head is None


def save_tiny_mistral(directory, **overrides):
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.3,
        **overrides)
    model = transformers.MistralForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    return model


def test_mistral_without_sliding_window_gets_transformers_default_window(tmp_path):
    hf = save_tiny_mistral(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("sliding_window", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert transformers.AutoConfig.from_pretrained(tmp_path).sliding_window == 4096
    model = load_model(str(tmp_path))
    assert model.config.sliding_window == 4096 and model.config.window_layers == (0, 1)
    tokens = [5, 17, 3, 88, 41, 9]
    cache = KVCache.dense(num_layers=2, max_batch=1, capacity=4096, kv_heads=2, head_dim=8, dtype=jnp.float32)
    logits, _ = model(jnp.asarray([tokens], jnp.int32), jnp.arange(6, dtype=jnp.int32)[None], cache,
                      start=jnp.zeros(1, jnp.int32), count=jnp.full(1, 6, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits)[0], hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,config_class", [("llama", "LlamaConfig"), ("mistral", "MistralConfig")])
def test_missing_fields_take_transformers_defaults(tmp_path, model_type, config_class):
    from jax_vattention.models.hf_loader import HF_DEFAULTS, config_from_hf
    hf_config = getattr(transformers, config_class)()
    ours = config_from_hf({"model_type": model_type})
    assert ours.vocab_size == hf_config.vocab_size and ours.hidden_size == hf_config.hidden_size
    assert ours.intermediate_size == hf_config.intermediate_size
    assert ours.num_layers == hf_config.num_hidden_layers and ours.num_heads == hf_config.num_attention_heads
    assert ours.num_kv_heads == hf_config.num_key_value_heads and ours.head_dim == hf_config.head_dim
    assert ours.max_position_embeddings == hf_config.max_position_embeddings
    assert ours.rms_norm_eps == hf_config.rms_norm_eps and ours.tie_embeddings == hf_config.tie_word_embeddings
    assert ours.rope_theta == hf_config.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.eos_token_ids == (hf_config.eos_token_id,)
    assert ours.sliding_window == getattr(hf_config, "sliding_window", None)
    for field, default in HF_DEFAULTS[model_type].items():
        if field not in ("num_key_value_heads", "head_dim"):  # filled in from the head count
            assert getattr(hf_config, field, default) == default, field  # absent there: no such feature


def test_checkpoint_chat_template_renders_as_transformers_does(tmp_path):
    import tokenizers
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for message in messages %}\n"
                "  {% if message['role'] == 'user' %}[U] {{ message['content'] | trim }}\n"
                "  {% else %}{{ raise_exception('only user turns') }}{% endif %}\n"
                "{% endfor %}{% if add_generation_prompt %}[A]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": "</s>", "chat_template": template}))
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": " hello world "}, {"role": "user", "content": "world"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode("hello world").ids == [3, 4]
    with pytest.raises(ValueError, match="only user turns"):
        ours.apply_chat_template([{"role": "assistant", "content": "hello"}])
