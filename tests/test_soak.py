"""The engine soak (``tests/soak_engine.py``) in its own process, so that a fault cannot kill the suite."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_vattention

SCRIPT = Path(__file__).with_name("soak_engine.py")


def run_soak(*args, timeout):
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, f"soak failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    assert "SOAK OK" in done.stdout
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [False, True])
def test_cpu_soak_with_preemptions(pipeline):
    """Pipelined, the random preemptions between steps catch requests with a token in flight."""
    print(run_soak("--device", "cpu", "--steps", "200", "--max-prompt", "15", "--sample", "6",
                   *(["--pipeline"] if pipeline else []), timeout=600))


@pytest.mark.gpu
def test_gpu_soak_of_twenty_thousand_decode_steps():
    print(run_soak("--device", "gpu", "--steps", "20000", "--sample", "24", timeout=3600))
