"""Continuous batching: :class:`Engine`, :class:`EngineConfig`, :class:`Request`, :class:`TokenEvent`
(with :class:`TokenLogprob` where a request asks for log-probabilities)."""

from jax_vattention.engine.config import EngineConfig
from jax_vattention.engine.engine import Engine, EngineStats
from jax_vattention.engine.requests import Request, TokenEvent, TokenLogprob

__all__ = ["Engine", "EngineConfig", "EngineStats", "Request", "TokenEvent", "TokenLogprob"]
