"""Registers the C++ core's XLA FFI handlers with JAX, once per process."""

from __future__ import annotations

import jax

import jax_vattention._core as _core

GROW_TARGET = "vattention_grow"
UNINITIALIZED_TARGET = "vattention_uninitialized"


def _register() -> None:
    for platform, targets in _core.ffi_targets.items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)


_register()
