"""The engine's switches: :class:`EngineConfig`."""

from __future__ import annotations

import dataclasses

from jax_vattention.engine.memory import MemoryPolicy
from jax_vattention.engine.speculation import METHODS as SPECULATION_METHODS


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs.

    token_budget : tokens per step at most: one per decoding request plus prompt chunks. A smaller
        budget bounds the slowest steps, a larger one finishes prompts sooner (the measurements that
        chose 512: docs/benchmarks.md)
    chunk_tokens : the width of a prefill row (a prompt takes several rows of a step if the
        budget allows); a mixed step has ``chunk_rows = max(1, token_budget // chunk_tokens)``
    backend : attention backend (``blocked``, ``xla``, ``cudnn``, ``pallas``); None: the default of the
        cache's device and layout (:func:`~jax_vattention.attention.resolve_backend`). Prompt chunks
        run the in-place chunk kernel (:func:`~jax_vattention.attention.chunk_attention`)
    overlap, deferred_reclamation, eager_allocation, prefix_sharing, prefetch_tokens : the memory
        policies (:class:`~jax_vattention.engine.memory.MemoryPolicy`); prefix sharing needs pages
        that one physical page can back at several addresses (``CacheHost.tokens_per_page`` is 0
        elsewhere, and then nothing is shared)
    max_stop_tokens : the most stop tokens a request may give (``stop_tokens`` and ``stop_token_ids``)
    max_logit_bias : the most ``logit_bias`` entries a request may give
    max_logprobs : the most top log-probabilities a request may ask for (``logprobs``,
        ``prompt_logprobs``); a step that computes them returns this many (vLLM's default is 20)
    seed : the seed of the sampling stream of requests without their own
    pipeline : dispatch each step before reading the previous one's tokens (vLLM v1's asynchronous
        scheduling): the host plans, maps and streams while the device computes. A request that
        stops on a stop token has already been given one more step, whose token is dropped. On by
        default (faster on every workload measured: docs/benchmarks.md); the same tokens either way
    speculate : speculative decoding: ``"ngram"`` proposes tokens by prompt lookup, ``"draft"`` by
        the engine's draft model (:mod:`~jax_vattention.engine.speculation`), and each step verifies
        them; None: off. Greedy requests yield the same tokens either way, sampling ones the same
        distribution
    num_speculative_tokens : the most tokens a request proposes a step (adapted per request below it)
    """

    token_budget: int = 512
    chunk_tokens: int = 64
    backend: str | None = None
    overlap: bool = True
    deferred_reclamation: bool = True
    eager_allocation: bool = True
    prefix_sharing: bool = True
    prefetch_tokens: int | None = None
    max_stop_tokens: int = 8
    max_logit_bias: int = 32
    max_logprobs: int = 20
    seed: int = 0
    pipeline: bool = True
    speculate: str | None = None
    num_speculative_tokens: int = 4

    @property
    def memory_policy(self) -> MemoryPolicy:
        """The memory policies, for :class:`~jax_vattention.engine.memory.CacheMemory`."""
        return MemoryPolicy(self.overlap, self.deferred_reclamation, self.eager_allocation, self.prefix_sharing,
                            self.prefetch_tokens)

    @property
    def prefetch_horizon(self) -> int:
        """Tokens mapped ahead of every running slot when memory allows."""
        return self.memory_policy.prefetch_horizon

    @property
    def chunk_rows(self) -> int:
        """Prefill rows of a mixed step."""
        return max(1, self.token_budget // self.chunk_tokens)

    def __post_init__(self):
        if self.prefetch_tokens is not None and self.prefetch_tokens < 1:
            raise ValueError(f"prefetch_tokens must be at least 1 (or None for the default), "
                             f"got {self.prefetch_tokens}")
        if self.token_budget < 1 or self.chunk_tokens < 1:
            raise ValueError(f"token_budget and chunk_tokens must be at least 1, got {self.token_budget} "
                             f"and {self.chunk_tokens}")
        if self.max_stop_tokens < 1:
            raise ValueError(f"max_stop_tokens must be at least 1, got {self.max_stop_tokens}")
        if self.max_logit_bias < 0 or self.max_logprobs < 0:
            raise ValueError(f"max_logit_bias and max_logprobs must be at least 0, got {self.max_logit_bias} "
                             f"and {self.max_logprobs}")
        if self.speculate is not None and self.speculate not in SPECULATION_METHODS:
            raise ValueError(f"speculate must be one of {SPECULATION_METHODS} or None, got {self.speculate!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be between 1 and 16, got {self.num_speculative_tokens}")
