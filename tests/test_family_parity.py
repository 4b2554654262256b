"""Every model family and rope type against Hugging Face ``transformers``, in float32 on CPU.

Families: Llama (with attention biases), Mistral (a window in every layer), Qwen 2 (q/k/v biases,
a window in its top layers), Qwen 3 (q/k norms), Gemma 2 (every other layer sliding, soft-capped
attention and output logits, GeGLU, sandwich norms, scaled embeddings) and Gemma 3 (sliding
layers with their own rotary base, q/k norms, linear scaling on the full layers). Rope types on
Llama: default, linear, dynamic NTK, llama3, YaRN and LongRoPE, the last three with lengths that
cross their thresholds. Checkpoints: :mod:`family_checkpoints` (initializer range 0.05, perturbed
norms and biases). Targets: greedy generation token for token over 64 tokens, each token's logits
within 1e-4 of transformers' (through a dense cache and the virtual one), and prefill logits
within 1e-4 at every position up to 4,096.
"""

import numpy as np
import pytest

PARITY = "the transformers parity tests need the parity extra: pip install '.[parity]' (a CPU torch first, see README)"
torch = pytest.importorskip("torch", reason=PARITY)
transformers = pytest.importorskip("transformers", reason=PARITY)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import family_checkpoints as checkpoints  # noqa: E402
import jax_vattention as jv  # noqa: E402
from jax_vattention import _core  # noqa: E402
from jax_vattention.cache.kv_cache import KVCache  # noqa: E402
from jax_vattention.decode.generate import generate, generate_in_manager  # noqa: E402
from jax_vattention.models.hf_loader import load_model  # noqa: E402

NEW_TOKENS = 64
PROMPTS = (5, 40)  # both cross the window of 16 within the 64 new tokens; 40 + 64 crosses 64 (dynamic, longrope)
CAPACITY = 112
LONG = 4096


def _reference(directory, hf):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, checkpoints.VOCAB, size=n).tolist() for n in PROMPTS]
    return prompts, [checkpoints.hf_generate(hf, prompt, NEW_TOKENS) for prompt in prompts]


@pytest.fixture(scope="module", params=sorted(checkpoints.FAMILIES))
def family(request, tmp_path_factory):
    """(name, checkpoint directory, prompts, transformers' tokens and logits of each)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = checkpoints.save_family(directory, request.param)
    return (request.param, str(directory), *_reference(directory, hf))


def check_generation(model, prompts, reference, result):
    for prompt, (want_tokens, want_logits), tokens, logits in zip(prompts, reference, result.tokens, result.logits):
        assert tokens == want_tokens
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


def virtual_manager(config, max_batch: int):
    """A virtual cache that unmaps the pages behind the model's windows (32 tokens a page), on the fake
    driver that fills an unmapped page with NaN: a read behind a window would poison the logits."""
    page = 4096
    cache_config = jv.CacheConfig(
        num_layers=config.num_layers, max_batch=max_batch, max_len=CAPACITY, kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, dtype=jnp.float32, page_bytes=page, budget_bytes=1 << 30,
        window=config.sliding_window, window_layers=config.window_layers if config.sliding_window else None)
    return jv.CacheManager(cache_config, jax.devices("cpu")[0],
                           driver=_core.FakeDriver(page, host_pages=True, poison_unmapped=True))


@pytest.mark.parametrize("cache", ["dense", "virtual"])
def test_greedy_generation_matches_transformers(family, cache):
    name, directory, prompts, reference = family
    model = load_model(directory)
    if cache == "dense":
        config = model.config
        kv = KVCache.dense(num_layers=config.num_layers, max_batch=len(prompts), capacity=CAPACITY,
                           kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
        result, _ = generate(model, kv, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    else:
        with virtual_manager(model.config, len(prompts)) as manager:
            result = generate_in_manager(model, manager, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
            unmapped = manager.stats()["window_pages_unmapped_total"]
        assert (unmapped > 0) == (model.config.sliding_window is not None)
    check_generation(model, prompts, reference, result)


@pytest.mark.parametrize("rope", sorted(checkpoints.ROPES))
def test_rope_types_generate_as_transformers(tmp_path, rope):
    hf = checkpoints.save_rope(tmp_path, rope)
    prompts, reference = _reference(tmp_path, hf)
    model = load_model(str(tmp_path))
    expected = None if rope == "default" else ("llama3" if rope == "llama3" else rope)
    assert (model.config.rope_scaling.kind if model.config.rope_scaling else None) == expected
    kv = KVCache.dense(num_layers=model.config.num_layers, max_batch=len(prompts), capacity=CAPACITY,
                       kv_heads=2, head_dim=16, dtype=jnp.float32)
    result, _ = generate(model, kv, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    check_generation(model, prompts, reference, result)


def prefill_logits(model, tokens) -> np.ndarray:
    config = model.config
    cache = KVCache.dense(num_layers=config.num_layers, max_batch=1, capacity=len(tokens),
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    length = len(tokens)
    run = jax.jit(lambda cache, tokens: model(
        tokens, jnp.arange(length, dtype=jnp.int32)[None], cache, start=jnp.zeros(1, jnp.int32),
        count=jnp.full(1, length, jnp.int32), backend="blocked")[0])
    return np.asarray(run(cache, jnp.asarray([tokens], jnp.int32)))[0]


@pytest.mark.parametrize("name", [f"family-{f}" for f in sorted(checkpoints.FAMILIES)]
                         + [f"rope-{r}" for r in sorted(checkpoints.ROPES)])
def test_prefill_logits_match_transformers_up_to_position_4096(tmp_path, name):
    """Windows of 1,024 (a window's edge far from the start) and every rope type's long-context path."""
    kind, which = name.split("-")
    if kind == "family":
        windowed = which in ("mistral", "qwen2", "gemma2", "gemma3")
        hf = checkpoints.save_family(tmp_path, which, **({"sliding_window": 1024} if windowed else {}))
    else:
        hf = checkpoints.save_rope(tmp_path, which)
    model = load_model(str(tmp_path))
    tokens = np.random.default_rng(1).integers(0, checkpoints.VOCAB, size=LONG).tolist()
    np.testing.assert_allclose(prefill_logits(model, tokens), checkpoints.hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_windows_and_caps_change_the_logits(tmp_path):
    """The checkpoints' windows and caps are in effect where the tests look: without them, the
    logits past the window differ from transformers' by far more than the tolerance."""
    hf = checkpoints.save_family(tmp_path, "gemma2")
    model = load_model(str(tmp_path))
    tokens = np.random.default_rng(2).integers(0, checkpoints.VOCAB, size=48).tolist()
    want = checkpoints.hf_logits(hf, tokens)
    np.testing.assert_allclose(prefill_logits(model, tokens), want, atol=1e-4, rtol=1e-4)
    for change in (dict(sliding_window=None, sliding_layers=None), dict(attn_softcap=None),
                   dict(final_softcap=None), dict(norm_offset=0.0)):
        changed = load_model(str(tmp_path))
        changed.config = changed.config.replace(**change)
        for block, layer in zip(changed.layers, range(changed.config.num_layers)):
            block.attention.window = changed.config.layer_window(layer)
            block.attention.softcap = changed.config.attn_softcap
            for norm in (block.attention_norm, block.mlp_norm, block.post_attention_norm, block.post_mlp_norm):
                norm.offset = changed.config.norm_offset
        assert np.abs(prefill_logits(changed, tokens) - want)[WINDOW_END:].max() > 1e-2, change


WINDOW_END = checkpoints.WINDOW + 1
