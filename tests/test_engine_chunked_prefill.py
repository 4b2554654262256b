"""Stall-free serving on the CPU: chunked prefill in the engine gives the tokens of unchunked
``generate`` on both layouts (the scheduler's decisions: test_scheduler.py; the compiled step:
test_runner.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from caches import model_manager
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.decode.generate import generate

CPU = jax.devices("cpu")[0]
PAGE = 4096


def unchunked(model, requests):
    """The reference: ``generate`` of all prompts at once on a dense cache (one whole prefill each)."""
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=len(requests), capacity=256,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, [r.prompt for r in requests],
                         max_new_tokens=[r.max_new_tokens for r in requests])
    return result.tokens


PROMPTS = [np.random.default_rng(7).integers(2, 256, length).tolist() for length in (23, 9, 40)]


@pytest.fixture(scope="module")
def reference(model):
    requests = [Request(prompt=prompt, max_new_tokens=6) for prompt in PROMPTS]
    return requests, unchunked(model, requests)


@pytest.mark.parametrize(("layout", "chunk_tokens"), [
    ("per_layer", 1), ("per_layer", 5), ("per_layer", 64), ("interleaved", 5),
    pytest.param("interleaved", 1, marks=pytest.mark.slow), pytest.param("interleaved", 64, marks=pytest.mark.slow)])
def test_chunked_prefill_gives_the_tokens_of_unchunked_generate(model, reference, layout, chunk_tokens):
    requests, expected = reference
    manager, _ = model_manager(model, layout=layout)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=max(chunk_tokens, 8), chunk_tokens=chunk_tokens))
        ids = [engine.submit(request) for request in requests]
        outputs = engine.run()
    assert [outputs[i] for i in ids] == expected
    if chunk_tokens < 40:
        assert any(r.decodes and r.chunk_tokens for r in engine.stats.records)   # mixed steps ran


@pytest.mark.slow
def test_bench_decode_reports_every_mode_and_writes_the_csv(tmp_path, capsys):
    from jax_vattention.app.cli import main
    assert main(["bench", "decode", "--batch", "2", "--context", "16", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "NOT A GPU" in report
    rows = (tmp_path / "decode.csv").read_text().splitlines()
    assert rows[0].startswith("card,date,config,batch,context,mode") and len(rows) == 6
    assert [row.split(",")[5] for row in rows[1:]] == ["static", "virtual_per_layer", "virtual_interleaved",
                                                      "paged_cudnn", "paged_pallas"]
    assert all(float(row.split(",")[7]) > 0 for row in rows[1:])
    assert "virtual / best paged" in report
