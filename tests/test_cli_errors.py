"""Mistakes a user can make on the command line: a one-line message and exit status 2, before anything
compiles (each case here fails in well under a second of work after the imports)."""

import json
import os
from unittest import mock

import jax
import numpy as np
import pytest

from jax_vattention.app.cli import main

TINY_HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256,
                  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2}


def _no_cache_program(*args, **kwargs):
    raise AssertionError("a program that takes the cache was traced: the error must come before any compile")


def run_cli(capsys, *argv) -> str:
    """Runs ``vattention argv``; asserts exit status 2 before any program that takes the cache is
    traced (every one passes the donation check first); returns stderr."""
    with mock.patch("jax_vattention.cache.donation.check_cache_donation", _no_cache_program), \
            pytest.raises(SystemExit) as exit_info:
        status = main(list(argv))
        raise SystemExit(status)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def write_checkpoint(directory, *, shards=False):
    """A checkpoint directory with a config and (unused-shape) tensors: enough to damage."""
    from safetensors.numpy import save_file

    (directory / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    tensors = {"model.embed_tokens.weight": np.zeros((256, 64), np.float32),
               "model.norm.weight": np.ones(64, np.float32)}
    if not shards:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    names = sorted(tensors)
    for i, name in enumerate(names):
        save_file({name: tensors[name]}, str(directory / f"model-{i}.safetensors"))
    weight_map = {name: f"model-{i}.safetensors" for i, name in enumerate(names)}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs here")
def test_generate_cudnn_on_cpu(capsys):
    assert "backend 'cudnn' needs a CUDA GPU" in run_cli(capsys, "generate", "--backend", "cudnn")


def test_generate_cudnn_cannot_read_interleaved():
    from jax_vattention.attention import backend_for

    class Gpu:
        platform = "gpu"

    with pytest.raises(ValueError, match="interleaved"):
        backend_for("cudnn", "interleaved", Gpu())
    assert backend_for("cudnn", "per_layer", Gpu()) == "cudnn"


def test_generate_huge_batch(capsys):
    err = run_cli(capsys, "generate", "--batch", "100000")
    assert "lower the slots (--batch, --max-batch) or --max-len" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--top-p", "0"], "--top-p in (0, 1]"),
    (["--config", "gpt-5"], "unknown config 'gpt-5'"),
    (["--model", "/no/such/checkpoint"], "no such directory"),
])
def test_generate_bad_options(capsys, argv, message):
    assert message in run_cli(capsys, "generate", *argv)


def test_checkpoint_config_is_a_list(capsys, tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    err = run_cli(capsys, "generate", "--model", str(tmp_path))
    assert "config.json must hold a JSON object; it holds a list" in err


def test_checkpoint_config_not_json(capsys, tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{model_type: llama")
    assert "config.json is not valid JSON" in run_cli(capsys, "generate", "--model", str(tmp_path))


def test_checkpoint_truncated_safetensors(capsys, tmp_path):
    write_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    err = run_cli(capsys, "generate", "--model", str(tmp_path))
    assert "model.safetensors is truncated" in err


def test_checkpoint_missing_shard(capsys, tmp_path):
    write_checkpoint(tmp_path, shards=True)
    os.remove(tmp_path / "model-1.safetensors")
    assert "model-1.safetensors is missing" in run_cli(capsys, "generate", "--model", str(tmp_path))


def test_checkpoint_index_without_weight_map(capsys, tmp_path):
    write_checkpoint(tmp_path, shards=True)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    err = run_cli(capsys, "generate", "--model", str(tmp_path))
    assert 'model.safetensors.index.json has no "weight_map"' in err


def test_checkpoint_loader_errors_are_wrapped(capsys, tmp_path):
    write_checkpoint(tmp_path)   # sound files, but most tensors are missing
    err = run_cli(capsys, "generate", "--model", str(tmp_path))
    assert f"checkpoint {tmp_path} lacks the tensor lm_head.weight" in err


@pytest.mark.parametrize("argv, message", [
    (["--requests", "0"], "--requests must be at least 1"),
    (["--rate", "0"], "--rate must be above 0"),
    (["--rate", "-5"], "--rate must be above 0"),
    (["--prompt-len", "100", "10"], "--prompt-len MIN MAX needs 1 <= MIN <= MAX"),
    (["--max-len", "2"], "--max-len 2 is too short"),
    (["--budget-mib", "0"], "--budget-mib must be at least 1"),
    (["--out", "/proc/no-such-folder"], "--out /proc/no-such-folder: cannot write there"),
])
def test_serve_bench_bad_options(capsys, argv, message):
    assert message in run_cli(capsys, "serve-bench", *argv)


def test_serve_bench_budget_below_the_longest_request(capsys, tmp_path):
    err = run_cli(capsys, "serve-bench", "--budget-mib", "1", "--max-len", "4096", "--prompt-len", "2000", "4000",
                  "--output-len", "10", "20", "--out", str(tmp_path))
    assert "the workload's longest request (4000 prompt + 20 output tokens) cannot run" in err
    assert "budget" in err


def test_serve_bench_out_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert "cannot write there" in run_cli(capsys, "serve-bench", "--out", str(tmp_path / "file"))


@pytest.mark.parametrize("argv, message", [
    (["--max-len", "1"], "--max-len must be at least 2"),
    (["--budget-mib", "0"], "--budget-mib must be at least 1"),
    (["--port", "70000"], "--port must be in [0, 65536)"),
    (["--config", "gpt-5"], "unknown config 'gpt-5'"),
    (["--dp", "0"], "--dp must be at least 1"),
    (["--dp", "64", "--tp", "1"], "--dp 64 replicas of --tp 1 devices each need 64 devices; JAX sees"),
    (["--dp", "2", "--speculate", "draft:smollm2-135m"], "with --dp, use --speculate ngram"),
])
def test_serve_bad_options(capsys, argv, message):
    assert message in run_cli(capsys, "serve", *argv)
