"""Benchmarks: ``python -m jax_vattention.bench {alloc,attention}`` or ``vattention bench ...``."""
