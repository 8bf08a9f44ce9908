"""Preallocated per-layer K/V of finished blocks, stored in the attention kernel's layout.

A cache is a dict `{stack: {"k": [L, B, KV, S, d], "v": [L, B, KV, S, d]}}` with one entry per
layer stack of the params (`dense`, `moe`); slot s holds the (post-RoPE) key/value of canvas
position s. Which slots are valid is decided by the caller through the key `Layout` (`[B, S]`).

The layout is the one the Pallas kernel reads (`kernels.block_attention`: a K/V tile is
`[block_k, d]` of one (layer, row, KV head)), so a decode step passes the whole stacked cache to
the attention as its own operands (`cache_k`, `cache_v`, with the layer index) and nothing is
concatenated, transposed or padded per layer. `capacity` rounds the slot count so that the
kernel's cache tiles divide it.

`write` commits new K/V in place: one scatter per leaf into slots `start[b] .. start[b] + W` of
each row (batch as a scatter batching dimension: no transpose of the cache, and GSPMD keeps a
batch-split cache split); rows that do not commit write back their old block, read as a small
gather, instead of a select over the whole cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from llada_jax.config import ModelConfig

Cache = dict

# Key tiles of the Pallas kernel hold a multiple of 128 slots (TPU lanes), at most 512, unless
# one tile covers the whole cache; `capacity` keeps the slot count divisible by one of them.
SLOT_TILE = 128
MAX_WHOLE_TILE = 512


def stack_sizes(c: ModelConfig) -> dict[str, int]:
  return {name: n for name, n in (("dense", c.num_dense_layers), ("moe", c.num_moe_layers)) if n}


def capacity(length: int) -> int:
  """Slots to allocate for `length` positions: `length` itself up to 512 (one whole-axis key
  tile), else rounded up to a multiple of 128 (so 128-slot tiles divide it)."""
  if length <= MAX_WHOLE_TILE:
    return length
  return -(-length // SLOT_TILE) * SLOT_TILE


def init_cache(c: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """Zeros for `length` slots per row (pass `capacity(n)` for a kernel-friendly size)."""
  dtype = jnp.dtype(dtype or c.dtype)
  shape = lambda n: (n, batch, c.num_key_value_heads, length, c.head_dim)
  return {name: {"k": jnp.zeros(shape(n), dtype), "v": jnp.zeros(shape(n), dtype)}
          for name, n in stack_sizes(c).items()}


def _dims(width: int):
  """Gather / scatter dimension numbers for a `[L, B, KV, width, d]` block per row at a start
  slot per row: B is a batching dimension, the slot axis (3) is indexed, the rest are window."""
  gather = lax.GatherDimensionNumbers(
      offset_dims=(0, 2, 3, 4), collapsed_slice_dims=(), start_index_map=(3,),
      operand_batching_dims=(1,), start_indices_batching_dims=(0,))
  scatter = lax.ScatterDimensionNumbers(
      update_window_dims=(0, 2, 3, 4), inserted_window_dims=(), scatter_dims_to_operand_dims=(3,),
      operand_batching_dims=(1,), scatter_indices_batching_dims=(0,))
  return gather, scatter


def read_block(cache_leaf: jax.Array, start: jax.Array, width: int) -> jax.Array:
  """`[L, B, KV, width, d]`: slots `start[b] .. start[b] + width` of each row (clamped)."""
  n, b, kv, s, d = cache_leaf.shape
  start = jnp.clip(start.astype(jnp.int32), 0, s - width)[:, None]
  gather, _ = _dims(width)
  return lax.gather(cache_leaf, start, gather, slice_sizes=(n, 1, kv, width, d),
                    mode=lax.GatherScatterMode.CLIP)


def write(cache: Cache, new: Cache, start: jax.Array, rows: jax.Array | None = None) -> Cache:
  """Writes `new` (`[L, B, W, KV, d]` per leaf, the layout of a forward's `kv`) into slots
  `start[b] .. start[b]+W` of each row, in place.

  Args:
    start: `[B]` int32 first slot per row (clamped so the block fits, like
      `dynamic_update_slice`). rows: optional `[B]` bool; rows that are False keep their old
      contents (their old block is read and written back).
  """
  def one(old, upd):
    upd = jnp.swapaxes(upd, 2, 3).astype(old.dtype)  # [L, B, KV, W, d]: the window, not the cache
    width, s = upd.shape[3], old.shape[3]
    first = jnp.clip(start.astype(jnp.int32), 0, s - width)
    if rows is not None:
      upd = jnp.where(rows[None, :, None, None, None], upd, read_block(old, first, width))
    _, scatter = _dims(width)
    return lax.scatter(old, first[:, None], upd, scatter, indices_are_sorted=True,
                       unique_indices=True, mode=lax.GatherScatterMode.CLIP)
  return jax.tree_util.tree_map(one, cache, new)
