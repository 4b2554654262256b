"""Tensor parallelism on 4 forced CPU devices (issue 13), in one subprocess (see ``tests/tp_cases.py``):
the rest of the suite keeps seeing its usual devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_vattention

SCRIPT = Path(__file__).with_name("tp_cases.py")
CASES = ["tokens_tp2_per_layer", "tokens_tp4_interleaved", "random_weights_straight_into_shards",
         "pages_per_device_are_exact", "a_copied_shard_gets_the_donation_error", "bad_meshes_and_head_counts",
         "a_failure_on_a_later_device_poisons_the_group", "cli_generate_tp"]


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    """Each case's report: "OK", or "FAILED" and its traceback."""
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900, env=env)
    reports, current = {}, None
    for line in done.stdout.splitlines():
        name, _, status = line.partition(" ")
        if name in CASES and status in ("OK", "FAILED"):
            current = name
            reports[name] = status
        elif current is not None:
            reports[current] += "\n" + line
    if sorted(reports) != sorted(CASES):  # the script runs every case it lists: the lists must agree
        pytest.fail(f"the script ran {sorted(reports)}, expected {sorted(CASES)} (exit {done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr[-4000:]}")
    return reports


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_case(outcomes, case):
    assert outcomes.get(case) == "OK", outcomes.get(case, f"{case} did not run")
