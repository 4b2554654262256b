"""GPU regressions of issue 10 that could fault, each in its own process (see ``tests/gpu_cases.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_vattention

SCRIPT = Path(__file__).with_name("gpu_cases.py")
CASES = ["engine_default_backend", "blocked_on_a_partly_mapped_cache", "chunk_attention_on_a_partly_mapped_cache",
         "out_of_pages_in_a_step_rebuilds_the_cache", "mosaic_prefill_matches_reference",
         "mosaic_generate_matches_cudnn", "paged_kernels_match_reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_case_in_its_own_process(case):
    package_parent = str(Path(jax_vattention.__file__).resolve().parent.parent)  # the package under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), case], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, f"{case} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    assert f"{case} OK" in done.stdout


def test_the_case_list_names_every_case():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_cases
    finally:
        sys.path.pop(0)
    assert sorted(CASES) == sorted(gpu_cases.CASES)
