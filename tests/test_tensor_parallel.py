"""Tensor parallelism on 4 forced CPU devices (issue 13), one subprocess per group of cases (see
``tests/tp_cases.py``): the rest of the suite keeps seeing its usual devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_vattention

SCRIPT = Path(__file__).with_name("tp_cases.py")
CASES = ["tokens_tp2_per_layer", "tokens_tp4_interleaved", "random_weights_straight_into_shards",
         "pages_per_device_are_exact", "a_copied_shard_gets_the_donation_error", "bad_meshes_and_head_counts",
         "a_failure_on_a_later_device_poisons_the_group",
         "a_failed_prefix_admission_on_a_later_device_poisons_the_group", "forks_at_tp2", "cli_generate_tp"]
ENGINE_CASES = ["engine_tp2_and_tp4_give_tp1_tokens_with_exact_pages", "engine_tp2_samples_as_tp1_with_every_knob",
                "engine_tp2_speculates_to_tp1_plain_tokens", "engine_tp2_forks_speculating_samples",
                "engine_tp2_fp8_and_windows_give_one_devices_tokens",
                "engine_shares_prefixes_at_tp2",
                "engine_refuses_a_mismatched_model",
                "checkpoint_straight_into_shards", "families_tp2_give_tp1_tokens", "fused_checkpoint_weights_per_device",
                "bad_tp_degrees_are_refused_in_one_line"]
SLOW_CASES = ["serve_bench_tp2", "bench_decode_tp2", "serve_tp2"]


def run_cases(cases: list[str]) -> dict[str, str]:
    """Runs ``cases`` in one process; each case's report: "OK", or "FAILED" and its traceback."""
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(SCRIPT), *cases], capture_output=True, text=True, timeout=900,
                          env=env)
    reports, current = {}, None
    for line in done.stdout.splitlines():
        name, _, status = line.partition(" ")
        if name in cases and status in ("OK", "FAILED"):
            current = name
            reports[name] = status
        elif current is not None:
            reports[current] += "\n" + line
    if sorted(reports) != sorted(cases):  # the script runs every case it is given
        pytest.fail(f"the script ran {sorted(reports)}, expected {sorted(cases)} (exit {done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr[-4000:]}")
    return reports


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    return run_cases(CASES)


@pytest.fixture(scope="module")
def engine_outcomes() -> dict[str, str]:
    return run_cases(ENGINE_CASES)


@pytest.fixture(scope="module")
def slow_outcomes() -> dict[str, str]:
    return run_cases(SLOW_CASES)


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_case(outcomes, case):
    assert outcomes.get(case) == "OK", outcomes.get(case, f"{case} did not run")


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_tensor_parallel_engine_case(engine_outcomes, case):
    assert engine_outcomes.get(case) == "OK", engine_outcomes.get(case, f"{case} did not run")


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_tensor_parallel_benchmark_case(slow_outcomes, case):
    assert slow_outcomes.get(case) == "OK", slow_outcomes.get(case, f"{case} did not run")


class _FakeGpu:
    platform, device_kind = "gpu", "a GPU of 79 GiB"


@pytest.mark.parametrize("count,budget_gib,advice", [(1, 16, "use --tp 4"), (2, 16, "use --tp 4"), (4, 16, None),
                                                     (8, 16, None), (4, 55, "use --tp 8"),
                                                     (4, 60, r"a cache of 4\d\.\d GiB would fit \(--budget-mib")])
def test_a_llama_3_70b_shape_is_refused_where_it_cannot_fit(monkeypatch, count, budget_gib, advice):
    """bf16 70B: 131.4 GiB of weights, 67.7 a device at TP 2; on 79 GiB GPUs with a 16 GiB cache budget
    it needs TP 4, and the refusal names the smallest degree that fits, or else the cache that would."""
    from jax_vattention.app import memory_fit as device_memory
    from jax_vattention.models.configs import get_config

    monkeypatch.setattr(device_memory, "free_bytes", lambda device: 79 << 30)
    config = get_config("llama-3-70b")
    assert round(device_memory.weight_bytes_per_device(config, 2) / 2**30, 1) == 67.7
    check = lambda: device_memory.check_fits(config, "llama-3-70b", [_FakeGpu()] * count, budget_gib << 30)  # noqa: E731
    if advice is None:
        check()
    else:
        with pytest.raises(ValueError, match=advice):
            check()
