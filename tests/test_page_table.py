"""The page table bench (the paper's Table 8) against the sizes worked out by hand."""

import math

import pytest

from jax_vattention.bench.page_table import measure
from jax_vattention.models import get_config

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("shape, tp, page, layout", [
    ("llama-3-8b", 1, 2 * MiB, "per_layer"),
    ("yi-6b", 2, 64 * KiB, "per_layer"),
    ("llama-3-8b", 2, 2 * MiB, "interleaved"),
    ("yi-34b", 1, 2 * MiB, "interleaved"),
])
def test_tokens_per_page_and_worst_waste(shape, tp, page, layout):
    model = get_config(shape)
    layers_per_buffer = model.num_layers if layout == "interleaved" else 1
    buffers = 2 if layout == "interleaved" else 2 * model.num_layers
    token = layers_per_buffer * (model.num_kv_heads // tp) * model.head_dim * 2  # bf16, one buffer
    tokens, waste = measure(shape, tp, page, layout)
    assert tokens == page / token
    # A buffer wastes at most a page less the smallest positive remainder a length can leave.
    assert waste == tp * buffers * (page - math.gcd(page, token))


def test_heads_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="cannot share"):
        measure("yi-6b", 8, 2 * MiB, "per_layer")
