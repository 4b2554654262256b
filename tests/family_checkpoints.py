"""Tiny random checkpoints of every model family and rope type, saved with transformers.

Weights are drawn with initializer range 0.05; every norm weight and bias is then perturbed, so
that a norm applied as ``weight`` instead of ``1 + weight`` (Gemma), or a bias left out, shows.
Windows are small (16) so that short sequences cross them, soft-caps low (Gemma 2) so that the
tanh bends the logits.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 97
WINDOW = 16
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, initializer_range=0.05)
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 64,
            "short_factor": np.linspace(1.0, 1.5, 8).round(3).tolist(),
            "long_factor": np.linspace(1.0, 6.0, 8).round(3).tolist()}

# name -> (config class, model class, config fields)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=WINDOW,
                                                      max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                         attn_logit_softcapping=1.0, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})),
}

# rope type -> (rope parameters of a Llama checkpoint, max_position_embeddings)
ROPES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 4096),
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 4096),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 64),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}, 4096),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
              "rope_theta": 10000.0}, 1024),
    "longrope": ({**LONGROPE, "rope_theta": 10000.0}, 256),
}


def perturb(model, seed: int = 0) -> None:
    """Every norm weight and bias gets N(0, 0.3) noise added."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def save_family(directory, family: str, *, seed: int = 0, max_position_embeddings: int = 4096, **overrides):
    """A tiny checkpoint of ``family`` (a key of :data:`FAMILIES`) in ``directory``; the model, float32, eval."""
    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        **{**SHAPE, "max_position_embeddings": max_position_embeddings, **fields, **overrides})
    model = getattr(transformers, model_class)(config).float().eval()
    perturb(model, seed)
    model.save_pretrained(directory)
    return model


def save_rope(directory, rope: str, *, seed: int = 0, **overrides):
    """A tiny Llama checkpoint rotating with the rope type ``rope`` (a key of :data:`ROPES`)."""
    parameters, max_positions = ROPES[rope]
    return save_family(directory, "llama", seed=seed, max_position_embeddings=max_positions,
                       rope_parameters=dict(parameters), attention_bias=False, **overrides)


def reset_rotary(model) -> None:
    """Forgets the frequencies a dynamic-NTK rotary embedding kept from an earlier, longer sequence
    (transformers keeps the longest length's until a sequence within the original length comes):
    each sequence then rotates as it would in a fresh model, as ours do."""
    rotary = model.model.rotary_emb
    if hasattr(rotary, "original_inv_freq") and hasattr(rotary, "original_max_seq_len"):
        rotary.inv_freq = rotary.original_inv_freq.clone()
        rotary.max_seq_len_cached = rotary.original_max_seq_len


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and the logits each was drawn from, float32 [max_new_tokens, vocab]."""
    reset_rotary(model)
    inputs = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: transformers would mask the prompt's tokens that equal pad_token_id
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.stack(out.logits, dim=1)[0].float().numpy()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """transformers' logits of one sequence in one forward pass, float32 [T, vocab]."""
    reset_rotary(model)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()
