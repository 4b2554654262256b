"""transformers' own loading of a GGUF file: the independent reference of our GGUF loader."""

import os

import pytest


def load_with_transformers(path: str):
    """``(model, tokenizer)`` transformers makes of the GGUF file at ``path``, float32 (skips the
    test where torch, transformers or accelerate is missing)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
    kwargs = dict(gguf_file=os.path.basename(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                                              **kwargs).eval()
    return model, transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kwargs)
