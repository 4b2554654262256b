"""The GGUF loader's architectures besides llama: qwen2, qwen3, gemma2 and gemma3.

Each file is written here as llama.cpp's converter writes one from a Hugging Face checkpoint
(its tensor names; ``attn_q`` / ``attn_k`` rows permuted for the llama architecture only; Gemma's
norms stored as ``1 + weight``; the metadata llama.cpp reads), from a random checkpoint that the
safetensors loader reads too: both loads must hold the same weights and give the same logits.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF loader needs the gguf package (pip install \".[demo]\")")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jax_vattention.cache.kv_cache import KVCache  # noqa: E402
from jax_vattention.models import gguf_loader, hf_loader  # noqa: E402
from random_checkpoints import write_random_checkpoint  # noqa: E402

SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
             torch_dtype="float32")
FAMILIES = {  # GGUF architecture -> config.json fields
    "llama": dict(model_type="llama", rope_theta=500000.0),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", rope_theta=1e6),
    "gemma2": dict(model_type="gemma2", sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                   final_logit_softcapping=5.0, rope_theta=10000.0),
    "gemma3": dict(model_type="gemma3_text", sliding_window=8, query_pre_attn_scalar=16, sliding_window_pattern=6,
                   rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "post_attention_layernorm": "ffn_norm"}
GEMMA_NAMES = {"pre_feedforward_layernorm": "ffn_norm", "post_attention_layernorm": "post_attention_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(name: str, gemma: bool) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if name in globals_:
        return globals_[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    names = {**GGUF_NAMES, **GEMMA_NAMES} if gemma else GGUF_NAMES
    return f"blk.{layer}.{names[module]}.{kind}"


def write_gguf(path, architecture: str, config, tensors: dict[str, np.ndarray]) -> None:
    """The file llama.cpp's converter writes for a checkpoint of ``config`` holding ``tensors``."""
    gemma = architecture.startswith("gemma")
    writer = gguf.GGUFWriter(str(path), architecture)
    a = architecture + "."
    integers = {"block_count": config.num_layers, "embedding_length": config.hidden_size,
                "feed_forward_length": config.intermediate_size, "context_length": config.max_position_embeddings,
                "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads,
                "attention.key_length": config.head_dim, "attention.value_length": config.head_dim,
                "vocab_size": config.vocab_size}
    reals = {"attention.layer_norm_rms_epsilon": config.rms_norm_eps, "rope.freq_base": config.rope_theta}
    if gemma and config.sliding_window is not None:
        integers["attention.sliding_window"] = config.sliding_window
        if config.attn_softcap:
            reals.update({"attn_logit_softcapping": config.attn_softcap, "final_logit_softcapping": config.final_softcap})
    if config.rope_scaling is not None:
        writer.add_string(a + "rope.scaling.type", config.rope_scaling.kind)
        reals["rope.scaling.factor"] = config.rope_scaling.factor
    for key, value in integers.items():
        writer.add_uint32(a + key, value)
    for key, value in reals.items():
        writer.add_float32(a + key, value)
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        if gemma and name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            value = value.reshape(heads, 2, config.head_dim // 2, -1).swapaxes(1, 2).reshape(value.shape)
        writer.add_tensor(gguf_name(name, gemma), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(model, tokens):
    config = model.config
    cache = KVCache.dense(num_layers=config.num_layers, max_batch=1, capacity=len(tokens),
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    out, _ = model(jnp.asarray([tokens], jnp.int32), jnp.arange(len(tokens), dtype=jnp.int32)[None], cache,
                   start=jnp.zeros(1, jnp.int32), count=jnp.full(1, len(tokens), jnp.int32), backend="xla")
    return np.asarray(out)[0]


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_a_converted_file_loads_as_its_checkpoint_does(tmp_path, architecture):
    write_random_checkpoint(str(tmp_path), {**SHAPE, **FAMILIES[architecture]})
    from_checkpoint = hf_loader.load_model(str(tmp_path))
    config = from_checkpoint.config
    path = tmp_path / f"{architecture}.gguf"
    write_gguf(path, architecture, config, load_file(str(tmp_path / "model.safetensors")))
    from_file = gguf_loader.load_model(str(path))
    ours = from_file.config.replace(eos_token_ids=config.eos_token_ids, rms_norm_eps=config.rms_norm_eps)  # a float32 there
    assert ours == config, (ours, config)
    import jax
    from flax import nnx
    for (name, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(from_checkpoint)),
                                 jax.tree_util.tree_leaves_with_path(nnx.state(from_file))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-7, err_msg=str(name))
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=40).tolist()
    np.testing.assert_allclose(logits(from_file, tokens), logits(from_checkpoint, tokens), atol=1e-5, rtol=1e-5)


def test_a_gemma_file_without_its_window_is_refused(tmp_path):
    write_random_checkpoint(str(tmp_path), {**SHAPE, **FAMILIES["gemma2"]})
    config = hf_loader.load_model(str(tmp_path)).config
    path = tmp_path / "gemma2.gguf"
    write_gguf(path, "gemma2", config.replace(sliding_window=None, sliding_layers=None, attn_softcap=None),
               load_file(str(tmp_path / "model.safetensors")))
    with pytest.raises(ValueError, match="lacks the metadata field 'gemma2.attention.sliding_window'"):
        gguf_loader.load_model(str(path))
