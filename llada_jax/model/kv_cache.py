"""Preallocated per-layer K/V of finished blocks.

A cache is a dict `{stack: {"k": [L, B, S, KV, d], "v": [L, B, S, KV, d]}}` with one entry per
layer stack of the params (`dense`, `moe`); slot s holds the (post-RoPE) key/value of canvas
position s. Which slots are valid is decided by the caller through the key `Layout`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig

Cache = dict


def stack_sizes(c: ModelConfig) -> dict[str, int]:
  return {name: n for name, n in (("dense", c.num_dense_layers), ("moe", c.num_moe_layers)) if n}


def init_cache(c: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """Zeros for `length` slots per row."""
  dtype = jnp.dtype(dtype or c.dtype)
  shape = lambda n: (n, batch, length, c.num_key_value_heads, c.head_dim)
  return {name: {"k": jnp.zeros(shape(n), dtype), "v": jnp.zeros(shape(n), dtype)}
          for name, n in stack_sizes(c).items()}


def write(cache: Cache, new: Cache, start: jax.Array, rows: jax.Array | None = None) -> Cache:
  """Writes `new` (`[L, B, W, KV, d]` per leaf) into slots `start[b] .. start[b]+W` of each row.

  Args:
    start: `[B]` int32 first slot per row. rows: optional `[B]` bool; rows that are False keep
      their old contents.
  """
  def one(old, upd):
    def per_row(o, u, s):  # o: [L, S, KV, d], u: [L, W, KV, d]
      return jax.lax.dynamic_update_slice(o, u.astype(o.dtype), (0, s, 0, 0))
    out = jax.vmap(per_row, in_axes=(1, 1, 0), out_axes=1)(old, upd, start)
    if rows is not None:
      out = jnp.where(rows[None, :, None, None, None], out, old)
    return out
  return jax.tree_util.tree_map(one, cache, new)
