"""The LLaDA2 MoE block: sigmoid router with expert bias and group-limited top-k, routed SwiGLU
experts (grouped matmul with `lax.ragged_dot`, or a dense reference), and shared experts."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.model.layers import swiglu


def route(x: jax.Array, weight: jax.Array, expert_bias: jax.Array, c: ModelConfig):
  """Chooses experts per token (SPEC 1.1 MoE steps 1-5).

  Args:
    x: `[N, D]` tokens. weight: `[D, E]` router weight. expert_bias: `[E]`.
  Returns:
    logits `[N, E]` float32 (pre-sigmoid), idx `[N, K]` int32 chosen experts in descending order
    of the bias-corrected score, weights `[N, K]` float32 (normalised unbiased scores times
    routed_scaling_factor).
  """
  n = x.shape[0]
  e, g = c.num_experts, c.n_group
  logits = jnp.dot(x.astype(jnp.float32), weight.astype(jnp.float32))
  scores = jax.nn.sigmoid(logits)
  biased = scores + expert_bias.astype(jnp.float32)
  group_scores = jax.lax.top_k(biased.reshape(n, g, e // g), 2)[0].sum(-1)
  _, top_groups = jax.lax.top_k(group_scores, c.topk_group)
  keep_group = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
  keep = jnp.repeat(keep_group, e // g, axis=1)
  _, idx = jax.lax.top_k(jnp.where(keep, biased, -jnp.inf), c.num_experts_per_tok)
  w = jnp.take_along_axis(scores, idx, axis=1)
  if c.num_experts_per_tok > 1:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return logits, idx.astype(jnp.int32), w * c.routed_scaling_factor


def experts_ragged(x: jax.Array, idx: jax.Array, gate, up, down) -> jax.Array:
  """Dropless grouped matmul: `[N, D]` tokens, `[N, K]` experts -> `[N, K, D]` expert outputs.

  Token copies are sorted by expert and run through `lax.ragged_dot` (one group per expert).
  """
  n, k = idx.shape
  e = gate.shape[0]
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = x[order // k]
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  ys = jax.lax.ragged_dot(h, down, sizes)
  return jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)


def experts_dense(x: jax.Array, idx: jax.Array, gate, up, down) -> jax.Array:
  """Reference: every expert on every token, then pick. `[N, D]`, `[N, K]` -> `[N, K, D]`."""
  all_out = jax.vmap(lambda g, u, d: swiglu(x, g, u, d), out_axes=1)(gate, up, down)
  return jnp.take_along_axis(all_out, idx[:, :, None], axis=1)


# impl(x [N, D], idx [N, K], gate [E, D, F], up [E, D, F], down [E, F, D]) -> [N, K, D]
EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense}

# Implementations that also weight and sum the K expert outputs of each token (expert
# parallelism: the tokens travel to their experts and come back combined):
# impl(x [N, D], idx [N, K], w [N, K] float32, gate, up, down) -> (y [N, D] float32, stats)
# where stats is a dict of arrays (at least "tokens_per_expert" [E] and "dropped" []).
COMBINED_EXPERT_IMPLS = {}
# Implementations living in other packages, imported (and registered) on first use.
_LAZY_EXPERTS = {"ep": "llada_jax.parallel.expert_parallel",
                 "ep_ragged": "llada_jax.parallel.expert_parallel"}


def register_experts(name: str, fn) -> None:
  """Makes `moe_impl=name` available (e.g. expert parallelism from `llada_jax.parallel`)."""
  EXPERT_IMPLS[name] = fn


def register_combined_experts(name: str, fn) -> None:
  """Makes `moe_impl=name` available for an implementation that also combines (see above)."""
  COMBINED_EXPERT_IMPLS[name] = fn


def expert_impl_names() -> list[str]:
  return sorted(set(EXPERT_IMPLS) | set(COMBINED_EXPERT_IMPLS) | set(_LAZY_EXPERTS))


def _load_experts(impl: str) -> None:
  if impl not in EXPERT_IMPLS and impl not in COMBINED_EXPERT_IMPLS and impl in _LAZY_EXPERTS:
    importlib.import_module(_LAZY_EXPERTS[impl])
  if impl not in EXPERT_IMPLS and impl not in COMBINED_EXPERT_IMPLS:
    raise ValueError(f"unknown moe_impl {impl!r}; choose from {expert_impl_names()}")


def moe_block(p: dict, x: jax.Array, c: ModelConfig, *, impl: str = "ragged",
              return_stats: bool = False):
  """MoE FFN on `[B, T, D]` activations; returns (output `[B, T, D]`, router logits, idx), plus
  load-balance stats (`tokens_per_expert` [E], `dropped` []) when `return_stats`."""
  b, t, d = x.shape
  flat = x.reshape(b * t, d)
  logits, idx, w = route(flat, p["router"]["weight"], p["router"]["expert_bias"], c)
  ex = p["experts"]
  _load_experts(impl)
  stats = None
  if impl in COMBINED_EXPERT_IMPLS:
    y, stats = COMBINED_EXPERT_IMPLS[impl](flat, idx, w, ex["gate"], ex["up"], ex["down"])
    y = y.astype(x.dtype)
  else:
    outs = EXPERT_IMPLS[impl](flat, idx, ex["gate"], ex["up"], ex["down"])
    y = jnp.einsum("nkd,nk->nd", outs.astype(jnp.float32), w).astype(x.dtype)
  if "shared" in p:
    s = p["shared"]
    y = y + swiglu(flat, s["gate"], s["up"], s["down"])
  out = (y.reshape(b, t, d), logits.reshape(b, t, -1), idx.reshape(b, t, -1))
  if not return_stats:
    return out
  if stats is None:  # a local implementation: every copy is computed
    stats = {"tokens_per_expert": jnp.bincount(idx.reshape(-1), length=c.num_experts),
             "dropped": jnp.zeros((), jnp.int32)}
  return out + (stats,)
