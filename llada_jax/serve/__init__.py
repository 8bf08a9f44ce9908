"""Serving: the continuous-batching engine (`engine`), the OpenAI-compatible HTTP API (`app`),
and `python -m llada_jax.serve`."""

from llada_jax.serve.engine import Engine, Request, RowResult

__all__ = ["Engine", "Request", "RowResult"]
