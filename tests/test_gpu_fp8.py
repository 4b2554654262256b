"""The FP8 KV cache on a CUDA GPU, each case in its own process (see ``tests/gpu_fp8_cases.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_vattention

SCRIPT = Path(__file__).with_name("gpu_fp8_cases.py")
CASES = ["triton_kernels_read_an_fp8_virtual_cache", "generate_on_an_fp8_gpu_cache"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_fp8_case_in_its_own_process(case):
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), case], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, f"{case} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    assert f"{case} OK" in done.stdout


def test_the_case_list_names_every_case():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_fp8_cases
    finally:
        sys.path.pop(0)
    assert sorted(CASES) == sorted(gpu_fp8_cases.CASES)
