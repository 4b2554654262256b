"""The FP8 KV cache on a CUDA GPU, each case in its own process (see ``tests/gpu_fp8_cases.py``)."""

from pathlib import Path

import pytest

from own_process import case_names, run_case

SCRIPT = Path(__file__).with_name("gpu_fp8_cases.py")
CASES = ["triton_kernels_read_an_fp8_virtual_cache", "generate_on_an_fp8_gpu_cache"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_fp8_case_in_its_own_process(case):
    run_case(SCRIPT, case)


def test_the_case_list_names_every_case():
    assert sorted(CASES) == sorted(case_names(SCRIPT))
