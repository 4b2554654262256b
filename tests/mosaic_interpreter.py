"""Pallas' Mosaic GPU interpreter for our Mosaic GPU kernels, on the CPU, on jax 0.10 and 0.11 alike.

jax 0.11 interprets the kernels as they are (``plgpu.InterpretGPUParams``). jax 0.10's interpreter (its
first release) lacks three rules the kernels need and jax 0.11 has; :func:`interpreter` adds them there,
following jax 0.11's semantics, and only there:

* ``layout_cast`` has no CPU lowering: a layout says how registers hold a value, so on the CPU it is
  the identity;
* a wgmma operand viewed transposed (``k_smem.transpose((1, 0))``): read, then transposed;
* a wgmma left operand held in registers (the probabilities of P @ V): used as the value it is.

The product itself is ``acc + a @ b`` in float32, as in jax's own interpreter.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu


def interpreter():
    """The interpreter parameters to pass as a kernel's ``interpret=``, with jax 0.10's gaps filled."""
    if hasattr(plgpu, "InterpretGPUParams"):
        return plgpu.InterpretGPUParams()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    _fill_jax_0_10_gaps()
    return InterpretGPUParams()


def reset() -> None:
    """Clears the interpreter's state, which an exception inside an interpreted kernel leaves behind."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()


@functools.cache
def _fill_jax_0_10_gaps() -> None:
    from jax._src import callback
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
    from jax._src.state import types as state_types

    mlir.register_lowering(gpu_core.layout_cast_p, lambda ctx, x, new_layout: [x], platform="cpu")

    def read(shared_memory, key, transforms, thread):
        transposed = bool(transforms) and isinstance(transforms[-1], state_types.TransposeTransform)
        transforms = jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms[:-1] if transposed else transforms))
        value, _, _ = shared_memory.get_buffer_content(gpu_callbacks.HostAllocationKey.from_array(key),
                                                       interpret_utils.to_range(transforms), thread)
        return np.swapaxes(value, -1, -2) if transposed else value

    def wgmma(*, token, device_id, thread_id, acc, acc_transforms, a, a_transforms, b, b_transforms, a_in_registers,
              acc_dtype):
        shared_memory = gpu_callbacks._get_shared_memory()
        thread = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
        lhs = np.asarray(a) if a_in_registers else read(shared_memory, a, a_transforms, thread)
        rhs = read(shared_memory, b, b_transforms, thread)
        acc_key = gpu_callbacks.HostAllocationKey.from_array(acc)
        acc_range = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
        total, _, _ = shared_memory.get_buffer_content(acc_key, acc_range, thread)
        total = total + np.matmul(lhs.astype(np.float32), rhs.astype(np.float32)).astype(acc_dtype)
        shared_memory.store_buffer_content(acc_key, acc_range, total, thread)
        return token

    def interpret_wgmma(self, eqn, token, get_invals):
        acc, a, b, *leaves = get_invals()
        empty = jax.tree.structure([])
        acc_transforms, a_transforms, b_transforms = jax.tree.unflatten(jax.tree_util.treedef_tuple((
            eqn.params["acc_transforms_tree"] or empty, eqn.params["a_transforms_tree"] or empty,
            eqn.params["b_transforms_tree"] or empty)), leaves)
        a_in_registers = not isinstance(eqn.invars[1].aval, state_types.AbstractRef)
        return callback.io_callback(
            functools.partial(wgmma, a_in_registers=a_in_registers, acc_dtype=eqn.invars[0].aval.dtype),
            gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
            thread_id=self.thread_id, acc=acc, acc_transforms=acc_transforms, a=a, a_transforms=a_transforms, b=b,
            b_transforms=b_transforms, ordered=True), []

    jaxpr_interpret.JaxprInterpreter._interpret_wgmma_ref_p = interpret_wgmma
