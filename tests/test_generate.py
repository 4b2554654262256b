"""Jitted generation: virtual cache against a dense reference, stop rules, sampling, compiles."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_vattention as jv
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.decode.generate import batch_bucket, generate, generate_fn, generate_in_manager, prompt_bucket
from jax_vattention.models import Llama, get_config

CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, rngs=nnx.Rngs(11))


def dense_cache(max_batch=4, capacity=128):
    return KVCache.dense(num_layers=CONFIG.num_layers, max_batch=max_batch, capacity=capacity,
                         kv_heads=CONFIG.num_kv_heads, head_dim=CONFIG.head_dim, dtype=jnp.float32)


def manager(max_batch=4, max_len=128, **kwargs):
    return jv.CacheManager(jv.CacheConfig(num_layers=CONFIG.num_layers, max_batch=max_batch, max_len=max_len,
                                          kv_heads=CONFIG.num_kv_heads, head_dim=CONFIG.head_dim,
                                          dtype=jnp.float32, **kwargs))


def random_prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, CONFIG.vocab_size, size=n).tolist() for n in lengths]


def full_forward_logits(model, sequence):
    """float32 [T, V]: the whole sequence in one uncached pass over a fresh dense cache."""
    cache = dense_cache(max_batch=1, capacity=len(sequence))
    logits, _ = model(jnp.asarray([sequence], jnp.int32), jnp.arange(len(sequence))[None], cache,
                      start=jnp.zeros(1, jnp.int32), count=jnp.full(1, len(sequence), jnp.int32))
    return np.asarray(logits[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_virtual_cache_matches_dense_reference(model, seed):
    rng = np.random.default_rng(seed)
    prompts = random_prompts(seed, rng.integers(1, 40, size=3))
    with manager() as virtual:
        pointer = virtual.cache.k[0].unsafe_buffer_pointer()
        grow_calls = virtual.stats()["grow_calls"]
        got = generate_in_manager(model, virtual, prompts, max_new_tokens=12, stop_tokens=[],
                                  return_logits=True)
        assert virtual.cache.k[0].unsafe_buffer_pointer() == pointer  # updated in place
        assert virtual.stats()["grow_calls"] - grow_calls == 11  # the mapping op ran in every decode step
        assert not virtual.active().any()
        want, _ = generate(model, dense_cache(capacity=virtual.capacity), prompts, max_new_tokens=12,
                           stop_tokens=[], return_logits=True)
    assert got.tokens == want.tokens
    for got_logits, want_logits in zip(got.logits, want.logits):
        np.testing.assert_array_equal(got_logits, want_logits)


def test_tokens_and_logits_match_an_uncached_forward_pass(model):
    prompts = random_prompts(2, [9, 1, 17])
    result, _ = generate(model, dense_cache(), prompts, max_new_tokens=10, stop_tokens=[], return_logits=True)
    for prompt, tokens, logits in zip(prompts, result.tokens, result.logits):
        assert len(tokens) == 10
        full = full_forward_logits(model, prompt + tokens[:-1])[len(prompt) - 1:]  # [10, V]
        np.testing.assert_allclose(logits, full, atol=1e-4, rtol=1e-4)
        assert tokens == np.argmax(full, axis=-1).tolist()


def test_padding_and_finished_rows_never_reach_the_cache(model):
    prompts = random_prompts(3, [4, 13])
    result, cache = generate(model, dense_cache(), prompts, slots=[3, 1], max_new_tokens=[6, 2], stop_tokens=[])
    assert [len(t) for t in result.tokens] == [6, 2]
    lengths = {3: 4 + 6 - 1, 1: 13 + 2 - 1}
    for layer in range(CONFIG.num_layers):
        for buffer in (np.asarray(cache.k[layer]), np.asarray(cache.v[layer])):
            for slot in range(4):
                written = np.flatnonzero(np.any(buffer[slot] != 0, axis=(1, 2)))
                assert written.tolist() == list(range(lengths.get(slot, 0)))


def test_per_sequence_stop_tokens_and_limits(model):
    prompts = random_prompts(4, [5, 8, 3])
    free, _ = generate(model, dense_cache(), prompts, max_new_tokens=12, stop_tokens=[])
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    result, _ = generate(model, dense_cache(), prompts, max_new_tokens=[12, 12, 4],
                         stop_tokens=[[stop], [], []])
    assert result.tokens[0] == free.tokens[0][:first + 1]  # stopped, stop token kept
    assert result.tokens[1] == free.tokens[1]  # unaffected by row 0's stop token
    assert result.tokens[2] == free.tokens[2][:4]  # its own max_new_tokens


def test_compiles_once_per_batch_and_prompt_bucket(model):
    cache = dense_cache(capacity=104)   # a cache shape no other test uses: its programs compile here
    compiled = generate_fn(nnx.split(model)[0], "blocked", False).jitted
    before = compiled._cache_size()
    requests = [([3, 7, 1], dict(max_new_tokens=5)),
                ([16, 2, 9, 11], dict(max_new_tokens=9, stop_tokens=[[1], [2], [], [4, 5]], slots=[2, 0, 1, 3])),
                ([12, 14, 5], dict(max_new_tokens=[1, 4, 20], temperature=[0.0, 0.7, 1.3], top_k=5, top_p=0.9,
                                   seed=3))]
    for seed, (lengths, options) in enumerate(requests):
        _, cache = generate(model, cache, random_prompts(seed, lengths), **options)
    assert compiled._cache_size() - before == 1
    _, cache = generate(model, cache, random_prompts(5, [17]))  # a new prompt bucket
    assert compiled._cache_size() - before == 2
    assert [batch_bucket(n, 4) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert [prompt_bucket(n, 128) for n in (1, 16, 17, 100, 128)] == [16, 16, 32, 128, 128]


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
    prompts = random_prompts(6, [6, 6])
    greedy, _ = generate(model, dense_cache(), prompts, max_new_tokens=8, stop_tokens=[])
    narrow, _ = generate(model, dense_cache(), prompts, max_new_tokens=8, stop_tokens=[], temperature=2.0,
                         top_k=[1, 0], top_p=[1.0, 1e-6], seed=1)
    assert narrow.tokens == greedy.tokens
    runs = [generate(model, dense_cache(), prompts, max_new_tokens=8, stop_tokens=[], temperature=1.5,
                     seed=seed)[0].tokens for seed in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]


def test_bad_requests_are_value_errors(model):
    cache = dense_cache(max_batch=2, capacity=32)
    with pytest.raises(ValueError, match="3 prompts but the cache has only 2 slots"):
        generate(model, cache, random_prompts(0, [2, 2, 2]))
    with pytest.raises(ValueError, match="prompt 1 has 40 tokens, more than max_len=32"):
        generate(model, cache, random_prompts(0, [2, 40]), max_new_tokens=4)
    with pytest.raises(ValueError, match="needs 35 positions"):
        generate(model, cache, random_prompts(0, [20]), max_new_tokens=16)
    with pytest.raises(ValueError, match="outside"):
        generate(model, cache, [[CONFIG.vocab_size]], max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        generate(model, cache, [[3]], max_new_tokens=4, backend="flash")


def test_manager_slots_are_freed_on_any_error(model):
    # one slot's pages use the whole budget: the second prompt cannot be admitted
    with manager(max_batch=2, max_len=64) as small:
        budget = small.stats()["page_bytes"] * 2 * CONFIG.num_layers
    with manager(max_batch=2, max_len=64, budget_bytes=budget) as small:
        with pytest.raises(jv.OutOfPagesError):
            generate_in_manager(model, small, random_prompts(0, [3, 3]), max_new_tokens=4)
        assert not small.active().any()
        with pytest.raises(ValueError, match="longer than max_len|more than max_len"):
            generate_in_manager(model, small, random_prompts(0, [65]))
        assert not small.active().any()
        result = generate_in_manager(model, small, random_prompts(0, [3]), max_new_tokens=4)
        assert len(result.tokens[0]) == 4


def run_command(argv):
    import argparse

    from jax_vattention.app.commands import generate as command
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_generate_command_reports_speed_and_memory(capsys):
    assert run_command(["--batch", "2", "--prompt-len", "8", "--max-new-tokens", "6", "--max-len", "1024",
                        "--rounds", "1", "--prompt", "hello", "--temperature", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "a static cache of 2 x 1024 tokens holds" in out
    assert out.count("prompt tokens -> 6 new") == 2


@pytest.mark.parametrize("argv,message", [
    (["--prompt-len", "300", "--max-len", "256"], "more than max_len=256"),
    (["--config", "gpt5"], "unknown config 'gpt5'"),
    (["--batch", "0"], "--batch must be at least 1"),
])
def test_generate_command_rejects_bad_input(capsys, argv, message):
    assert run_command(argv + ["--rounds", "1", "--max-new-tokens", "2"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "pallas"])
def test_gpu_virtual_cache_matches_dense_reference(backend):
    config = CONFIG.replace(dtype="bfloat16", head_dim=64, num_heads=8)
    model = Llama(config, rngs=nnx.Rngs(5))
    prompts = random_prompts(7, [5, 70, 33])
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=512,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16)
    with jv.CacheManager(cache_config) as virtual:
        got = generate_in_manager(model, virtual, prompts, max_new_tokens=20, stop_tokens=[], backend=backend,
                                  return_logits=True)
        capacity = virtual.capacity
    dense = KVCache.dense(num_layers=config.num_layers, max_batch=4, capacity=capacity,
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16)
    same_kernel, _ = generate(model, dense, prompts, max_new_tokens=20, stop_tokens=[], backend=backend,
                              return_logits=True)
    assert got.tokens == same_kernel.tokens
    dense = KVCache.dense(num_layers=config.num_layers, max_batch=4, capacity=capacity,
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16)
    reference, _ = generate(model, dense, prompts, max_new_tokens=20, stop_tokens=[], backend="xla",
                            return_logits=True)
    for tokens, want_tokens, logits, want_logits in zip(got.tokens, reference.tokens, got.logits,
                                                        reference.logits):
        same = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), len(tokens))
        steps = min(same + 1, len(tokens))  # bf16 kernels may break a near tie: compare up to it
        np.testing.assert_allclose(logits[:steps], want_logits[:steps], atol=0.1, rtol=0.05)
