"""How the Llama family splits over a tensor-parallel mesh (Megatron-style).

Every device holds ``1/N`` of the query and KV heads (``w_qkv`` and its bias ``b_qkv`` split on
their KV-heads axis, each KV head with its query heads; ``wo`` on its rows), of the MLP's columns
(``w_gate_up``) and of ``w_down``'s rows; the model sums each block's attention output and MLP
output over the mesh axis. Embeddings, norms (the per-head q/k norms too: one weight for every
head), the output projection's bias ``b_o`` (added once, after the sum) and ``lm_head`` are
replicated: every device computes the same logits and samples the same token with no gather.

The backend knows none of these names: it asks a model for its
:meth:`~jax_vattention.models.llama.Llama.partition_specs`
(:class:`~jax_vattention.decode.model.DecoderModel`).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

# The split axis of each weight, by its name: which axis holds heads or MLP columns.
_SPLIT_AXIS = {"w_qkv": 1, "b_qkv": 0, "wo": 0, "w_gate_up": 2, "w_down": 0}


def check_divisible(config, count: int) -> None:
    """``ValueError`` unless the query heads, KV heads and MLP width divide by ``count``."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % count:
            raise ValueError(f"{name}={getattr(config, name)} does not divide by the tensor-parallel degree "
                             f"{count}: every device must hold the same share")


def split_axis(name: str) -> int | None:
    """The axis a weight named ``name`` (``w_qkv``, ``w_down``, ...) is split on; None: replicated."""
    return _SPLIT_AXIS.get(name)


def partition_specs(state: nnx.State, axis: str):
    """The PartitionSpec of every weight in a model's ``state``: split per :func:`split_axis`, else
    replicated."""
    def spec(path, value):
        names = [str(getattr(key, "key", getattr(key, "name", ""))) for key in reversed(path)]
        name = next((name for name in names if name in _SPLIT_AXIS), None)
        if name is None:
            return P()
        axes = [None] * value.ndim
        axes[_SPLIT_AXIS[name]] = axis
        return P(*axes)
    return jax.tree_util.tree_map_with_path(spec, state)
