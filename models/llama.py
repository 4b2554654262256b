"""A decoder of the Llama family in Flax NNX that reads and writes a :class:`KVCache`.

One architecture serves Llama, Mistral, Qwen 2 and 3 and Gemma 2 and 3: what differs between
them (biases, q/k norms, norm offsets and sandwich norms, the activation, embedding scaling, the
logit scale, soft-caps, sliding windows and which layers use them, rotary scaling) are fields of
:class:`~.configs.LlamaConfig`, read by the blocks below. A sliding layer attends within its window
through the kernels' ``window`` (they read nothing behind it).

One forward pass serves prefill and decode alike: the new tokens' keys and
values go into the cache through :func:`~jax_vattention.cache.writes.write_kv` (only
``count[b]`` tokens of row ``b``, so padding never reaches the cache), and
attention reads the cache in place through :func:`~jax_vattention.attention.attend`.

Weights are laid out for einsums, with axis letters: ``V`` vocabulary,
``D`` model width, ``N`` query heads, ``K`` key/value heads, ``G`` query heads
per key/value head (``N = K * G``), ``H`` head_dim, ``F`` MLP width, ``C`` the
gate and up halves of the MLP's input projection.

The query, key and value projections are one weight ``w_qkv [D, K, G + 2, H]``
and the MLP's gate and up projections one weight ``w_gate_up [D, 2, F]``: one
matmul per projection group reads its weights once per decode step (a decode
step is bound by reading the weights; the fused matmuls' gain is measured in
docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jax_vattention.attention import attend, attend_prompt, prefill_attends_prompt
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.decode.step_batch import StepBatch
from jax_vattention.cache.quantization import write_dtype
from jax_vattention.cache.writes import write_kv

from . import sharding
from .configs import LlamaConfig
from .rope import RotaryTable, apply_rope, rotary_table


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    """A weight drawn from N(0, 1 / fan_in): activations keep unit scale through the network."""
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * jnp.asarray(fan_in ** -0.5, dtype))


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight ``[D]``.

    ``offset`` 0 (Llama, Qwen): ``weight * normed``, the product in the input's dtype. ``offset``
    1 (Gemma, whose weights store the scale minus one): ``(1 + weight) * normed`` in float32,
    then cast; each family's order, so that a bfloat16 model rounds as its checkpoint's does.
    """

    def __init__(self, dim: int, eps: float, dtype, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # [..., D]
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)  # [..., D]
        if self.offset:
            return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


def _norm(config: LlamaConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, config.jnp_dtype, config.norm_offset)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``, or ``x`` for no cap (Gemma 2's logit soft-capping)."""
    return x if cap is None else jnp.tanh(x / jnp.float32(cap)) * jnp.float32(cap)


class Attention(nnx.Module):
    """Grouped-query self-attention over the cache of one layer.

    Weights
    -------
    w_qkv : [D, K, G + 2, H], the query, key and value projections of each KV head side by side:
        ``w_qkv[:, k, :G]`` projects the query heads ``k * G .. k * G + G - 1`` (query head ``n``
        reads KV head ``n // G``, standard grouped-query attention), ``w_qkv[:, k, G]`` KV head
        ``k``'s key and ``w_qkv[:, k, G + 1]`` its value. One matmul reads all three at once (a
        decode step is bound by reading the weights), and splitting ``K`` over devices keeps each
        KV head with its query heads.
    b_qkv : [K, G + 2, H] or None, their biases (``qkv_bias``), laid out as ``w_qkv``'s columns.
    wo : [N, H, D], the output projection; its bias ``b_o [D]`` (``o_bias``) is added by the
        :class:`DecoderLayer`, after the tensor-parallel sum.
    q_norm, k_norm : RMSNorm over ``H`` of each query and key head (``qk_norm``), or None.

    ``window`` (static) is the layer's attention window (None: full), ``scale`` its logit scale and
    ``softcap`` its logit cap (None: none).
    """

    def __init__(self, config: LlamaConfig, layer: int = 0, *, rngs: nnx.Rngs):
        d, n, k, h, dtype = (config.hidden_size, config.num_heads, config.num_kv_heads,
                             config.head_dim, config.jnp_dtype)
        groups = n // k
        self.w_qkv = _normal(rngs, (d, k, groups + 2, h), d, dtype)  # [D, K, G + 2, H]
        self.b_qkv = nnx.Param(jnp.zeros((k, groups + 2, h), dtype)) if config.qkv_bias else None
        self.wo = _normal(rngs, (n, h, d), n * h, dtype)  # [N, H, D]
        self.q_norm = _norm(config, h) if config.qk_norm else None
        self.k_norm = _norm(config, h) if config.qk_norm else None
        self.window = config.layer_window(layer)
        self.scale = config.query_scale
        self.softcap = config.attn_softcap

    def __call__(self, x, positions, cache: KVCache, layer: int, *, rope, start, count, slots,
                 backend: str, step: StepBatch | None = None):
        qkv = jnp.einsum('BTD,DKGH->BTKGH', x, self.w_qkv[...])  # [B, T, K, G + 2, H]
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv[...]  # [B, T, K, G + 2, H]
        batch, tokens, kv_heads, per_kv_head, head_dim = qkv.shape
        groups = per_kv_head - 2  # each KV head's query heads, then its key and its value
        q = qkv[..., :groups, :].reshape(batch, tokens, kv_heads * groups, head_dim)  # [B, T, N, H]
        k = qkv[..., groups, :]  # [B, T, K, H]
        v = qkv[..., groups + 1, :]  # [B, T, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # [B, T, N, H], [B, T, K, H]
        inv_freq, attention_scaling = rope
        q = apply_rope(q, positions, inv_freq, attention_scaling)  # [B, T, N, H]
        k = apply_rope(k, positions, inv_freq, attention_scaling)  # [B, T, K, H]
        dtype = write_dtype(cache.k[0].dtype, x.dtype)  # the cache's, or ours for an FP8 cache (write_kv quantizes)
        mask = dict(scale=self.scale, window=self.window, softcap=self.softcap)
        if step is not None:
            out, cache = step.write_and_attend(cache, layer, q, k.astype(dtype), v.astype(dtype), backend, **mask)
            return jnp.einsum('BTNH,NHD->BTD', out.astype(x.dtype), self.wo[...]), cache  # [1, T, D]
        cache = write_kv(cache, layer, k.astype(dtype), v.astype(dtype), start, count, slots)
        k_cache, v_cache, index = cache.layer(layer)
        if q.shape[1] > 1 and prefill_attends_prompt(backend, interleaved=index is not None, softcap=self.softcap):
            # Prefill (from position 0): the prompt's own keys and values are all it attends to,
            # for a cache the kernel cannot read in place; as the cache holds them (FP8: its codes).
            out = attend_prompt(q, *cache.as_stored(k, v), count, backend=backend, scale=self.scale,
                                window=self.window)  # [B, T, N, H]
        else:
            out = attend(q, k_cache, v_cache, q_positions=positions, kv_lengths=start + count,
                         backend=backend, slots=slots, layer=index, **mask, **cache.kv_scales)  # [B, T, N, H]
        y = jnp.einsum('BTNH,NHD->BTD', out.astype(x.dtype), self.wo[...])  # [B, T, D]
        return y, cache


class MLP(nnx.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, SwiGLU (``silu``) or GeGLU (``gelu_tanh``).

    Weights
    -------
    w_gate_up : [D, 2, F], the gate projection (``w_gate_up[:, 0]``) and the up projection
        (``w_gate_up[:, 1]``): one matmul reads both at once (see :class:`Attention`'s ``w_qkv``).
    w_down : [F, D], the down projection.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, dtype = config.hidden_size, config.intermediate_size, config.jnp_dtype
        self.w_gate_up = _normal(rngs, (d, 2, f), d, dtype)  # [D, 2, F]
        self.w_down = _normal(rngs, (f, d), f, dtype)  # [F, D]
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = jnp.einsum('BTD,DCF->BTCF', x, self.w_gate_up[...])  # [B, T, 2, F]
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]  # [B, T, F] each
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)  # [B, T, F]
        return jnp.einsum('BTF,FD->BTD', act * up, self.w_down[...])  # [B, T, D]


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then the MLP; with ``sandwich_norms`` (Gemma) each
    output is normed again before it joins the residual stream."""

    def __init__(self, config: LlamaConfig, layer: int = 0, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.attention_norm = _norm(config, d)
        self.attention = Attention(config, layer, rngs=rngs)
        self.b_o = nnx.Param(jnp.zeros((d,), config.jnp_dtype)) if config.o_bias else None  # [D]
        self.post_attention_norm = _norm(config, d) if config.sandwich_norms else None
        self.mlp_norm = _norm(config, d)
        self.mlp = MLP(config, rngs=rngs)
        self.post_mlp_norm = _norm(config, d) if config.sandwich_norms else None

    def __call__(self, x, positions, cache, layer, *, tp_axis: str | None = None, **kwargs):
        attended, cache = self.attention(self.attention_norm(x), positions, cache, layer, **kwargs)
        if tp_axis is not None:
            attended = lax.psum(attended, tp_axis)  # [B, T, D]: the sum over every device's heads
        if self.b_o is not None:
            attended = attended + self.b_o[...]  # [B, T, D]
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)  # [B, T, D]
        x = x + attended  # [B, T, D]
        update = self.mlp(self.mlp_norm(x))  # [B, T, D]
        if tp_axis is not None:
            update = lax.psum(update, tp_axis)  # [B, T, D]: the sum over every device's MLP columns
        if self.post_mlp_norm is not None:
            update = self.post_mlp_norm(update)  # [B, T, D]
        x = x + update  # [B, T, D]
        return x, cache


@functools.lru_cache(maxsize=64)
def _rotary_table(config: LlamaConfig, sliding: bool, capacity: int) -> RotaryTable:
    return rotary_table(config, sliding=sliding, capacity=capacity)


class Llama(nnx.Module):
    """The decoder: embeddings, ``num_layers`` blocks, a final norm and the output projection.

    ``tp_axis`` (static, default None) names the mesh axis of tensor parallelism: set by
    :func:`jax_vattention.decode.mesh.shard_model`, the model then runs inside ``shard_map``
    on its devices' shards of the weights (Megatron-style: heads and MLP columns split) and sums
    each block's attention output and MLP output over that axis.

    Example::

        model = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
        cache = KVCache.dense(num_layers=2, max_batch=1, capacity=64, kv_heads=2, head_dim=16,
                              dtype=jnp.float32)
        tokens = jnp.array([[5, 6, 7]], jnp.int32)
        logits, cache = model(tokens, jnp.arange(3)[None], cache,
                              start=jnp.zeros(1, jnp.int32), count=jnp.full(1, 3, jnp.int32))
        logits.shape  # (1, 3, 256)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = config.jnp_dtype
        self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), 1, dtype)  # [V, D]
        self.layers = nnx.List([DecoderLayer(config, layer, rngs=rngs) for layer in range(config.num_layers)])
        self.norm = _norm(config, config.hidden_size)
        self.tp_axis: str | None = None
        self.lm_head = (None if config.tie_embeddings else
                        _normal(rngs, (config.hidden_size, config.vocab_size), config.hidden_size,
                                dtype))  # [D, V]

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *,
                 start: jax.Array, count: jax.Array, slots: jax.Array | None = None,
                 backend: str = "xla", logit_index: jax.Array | None = None, step: StepBatch | None = None):
        """Run ``tokens`` through the model, writing their keys and values into ``cache``.

        Parameters
        ----------
        tokens : int32 [batch, tokens]
        positions : int32 [batch, tokens], each token's position (``start[b] + t`` for real tokens)
        cache : the KV cache; its arrays are ``[max_batch, capacity, kv_heads, head_dim]``
        start : int32 [batch], the cache position of each row's first token
        count : int32 [batch], how many of each row's tokens are real; the rest is padding,
            never written to the cache
        slots : int32 [batch] or None, the cache slot of each row (default: row ``b`` is slot ``b``)
        backend : the attention backend (see :mod:`jax_vattention.attention`)
        logit_index : int32 [batch] or None, if given, compute logits only at this token of each row
            (int32 [batch, J]: at these J tokens of each row, logits [batch, J, vocab])
        step : a :class:`~jax_vattention.decode.step_batch.StepBatch` or None; if given, the tokens,
            positions and cache writes are the step's (``tokens`` is ``step.tokens()``, batch 1,
            and ``start``/``count``/``slots`` are unused); see :meth:`run_step`

        Returns
        -------
        logits : float32 [batch, tokens, vocab], or [batch, vocab] with ``logit_index``
        cache : the updated cache
        """
        config = self.config
        ropes = self._ropes(cache.capacity, positions, start, count, step)
        x = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D]
        if config.scale_embeddings:
            x = x * jnp.asarray(np.float32(config.hidden_size ** 0.5)).astype(x.dtype)  # [B, T, D]
        for layer, block in enumerate(self.layers):
            rope = ropes[config.layer_window(layer) is not None and config.sliding_rope_theta is not None]
            x, cache = block(x, positions, cache, layer, rope=rope, start=start,
                             count=count, slots=slots, backend=backend, step=step, tp_axis=self.tp_axis)
        if logit_index is not None and logit_index.ndim == 2:  # several tokens of each row
            x = jnp.take_along_axis(x, logit_index[:, :, None], axis=1)  # [B, J, D]
        elif logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]  # [B, D]
        x = self.norm(x)  # [B, (T,) D]
        if self.lm_head is None:
            logits = jnp.einsum('...D,VD->...V', x, self.embed[...],
                                preferred_element_type=jnp.float32)  # [B, (T,) V]
        else:
            logits = jnp.einsum('...D,DV->...V', x, self.lm_head[...],
                                preferred_element_type=jnp.float32)  # [B, (T,) V]
        return softcap(logits, config.final_softcap), cache

    def _ropes(self, capacity: int, positions, start, count, step: StepBatch | None):
        """``(frequencies, attention scaling)`` of the full layers and, where they rotate otherwise
        (Gemma 3), of the sliding layers (index 0 and 1): frequencies ``[H/2]``, or ``[B, T, H/2]``
        where they depend on each row's length (dynamic NTK, LongRoPE), the length a row reaches in
        this pass."""
        ropes = []
        for sliding in (False, True) if self.config.sliding_rope_theta is not None else (False,):
            table = _rotary_table(self.config, sliding, capacity)
            seq_lens = None
            if len(table.sets) > 1:
                if step is None:
                    seq_lens = jnp.broadcast_to((start + count)[:, None], positions.shape)  # [B, T]
                else:
                    seq_lens = step.sequence_lengths()  # [1, D + R*C + V*W]
            ropes.append((table.frequencies(seq_lens), table.attention_scaling))
        return ropes

    def partition_specs(self, axis: str, count: int):
        """How the weights split over ``count`` devices of mesh axis ``axis``
        (:mod:`~jax_vattention.models.sharding`); ``ValueError`` where the heads or the MLP width do
        not divide by ``count``."""
        sharding.check_divisible(self.config, count)
        return sharding.partition_specs(nnx.state(self), axis)

    def run_step(self, step: StepBatch, cache: KVCache, *, backend: str):
        """One engine step: the decode rows and prefill chunks of ``step`` in one pass.

        Returns float32 logits ``[len(step.logit_index()), vocab]`` (each decode row's, then each
        chunk's last real token's, then every verification token's) and the cache.
        """
        logits, cache = self(step.tokens(), step.positions(), cache, start=None, count=None,
                             backend=backend, logit_index=step.logit_index()[None], step=step)  # [1, D + R + V*W, V]
        return logits[0], cache
