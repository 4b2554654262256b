"""GPU regressions of issue 10 that could fault, each in its own process (see ``tests/gpu_cases.py``)."""

from pathlib import Path

import pytest

from own_process import case_names, run_case

SCRIPT = Path(__file__).with_name("gpu_cases.py")
CASES = ["engine_default_backend", "blocked_on_a_partly_mapped_cache", "chunk_attention_on_a_partly_mapped_cache",
         "out_of_pages_in_a_step_rebuilds_the_cache", "mosaic_prefill_matches_reference",
         "mosaic_generate_matches_cudnn", "paged_kernels_match_reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_case_in_its_own_process(case):
    run_case(SCRIPT, case)


def test_the_case_list_names_every_case():
    assert sorted(CASES) == sorted(case_names(SCRIPT))
