"""Continuous batching: :class:`Engine`, :class:`EngineConfig`, :class:`Request`, :class:`TokenEvent`."""

from jax_vattention.engine.engine import Engine, EngineConfig, EngineStats
from jax_vattention.engine.requests import Request, TokenEvent

__all__ = ["Engine", "EngineConfig", "EngineStats", "Request", "TokenEvent"]
