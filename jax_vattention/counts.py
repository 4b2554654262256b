"""Validation of the counts (tokens, pages, slots) that the API passes to C++."""

import numpy as np

# Counts (tokens, pages, slots) at or above this are refused before they reach C++, where they
# would wrap: no cache comes near it (a buffer has at most 2**48 bytes).
_COUNT_LIMIT = 2**63


def count(name: str, value) -> int:
    """``value`` as an int if it is a non-negative integer below 2**63, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if value >= _COUNT_LIMIT:
        raise ValueError(f"{name}={value} is too large (at least 2**63): pass a count that fits the cache")
    return int(value)
