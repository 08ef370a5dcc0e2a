"""Serving: a continuous-batching engine with per-request steering, feature reads and drift
monitoring (`engine`)."""

from jaxinterp.serving.engine import Engine, EngineConfig, EngineError, Request, StepOutput

__all__ = ["Engine", "EngineConfig", "EngineError", "Request", "StepOutput"]
