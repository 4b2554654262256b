"""Random safetensors checkpoints of any family the loader reads, without transformers."""

from __future__ import annotations

import json
import os

import numpy as np


def write_random_checkpoint(directory: str, hf_config: dict, *, seed: int = 2, scale: float = 0.3) -> None:
    """Random float32 tensors under every name and shape the loader expects for ``hf_config`` (a
    ``config.json``'s fields), and that config.json, in ``directory``."""
    from safetensors.numpy import save_file

    from jax_vattention.models.hf_loader import _placements, config_from_hf

    rng = np.random.default_rng(seed)
    parts = [part for parts in _placements(config_from_hf(hf_config)).values() for part in parts]
    save_file({part.name: (rng.normal(size=part.layout.source_shape) * scale).astype(np.float32) for part in parts},
              os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as out:
        json.dump(hf_config, out)
