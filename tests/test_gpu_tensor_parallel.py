"""Tensor parallelism on 2 GPUs (issue 13), each case in its own process (see ``tests/gpu_tp_cases.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jax_vattention

SCRIPT = Path(__file__).with_name("gpu_tp_cases.py")
CASES = ["llama8b_tp2_matches_tp1", "free_memory_per_device", "decode_step_timing", "engine_tp2_matches_tp1"]


def _gpus() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs at least 2 GPUs")
@pytest.mark.parametrize("case", CASES)
def test_gpu_tensor_parallel_case(case):
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), case], capture_output=True, text=True, timeout=900, env=env)
    print(done.stdout)
    assert done.returncode == 0, f"{case} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    assert f"{case} OK" in done.stdout
