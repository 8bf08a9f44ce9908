"""Who may attend to whom, from per-token ids: the single source of the LLaDA2 mask rules.

Every token carries three ids (a `Layout`):
  block    int32  block index (k // block_length for the inference canvas; 0 everywhere for a
                  fully bidirectional mask)
  noisy    bool   True for the noisy half x_t of the 2L training layout, False otherwise
  segment  int32  document id; tokens attend only within a segment; -1 marks a key slot that
                  holds nothing (padding, an unwritten KV-cache slot): it is visible to no one.

`visible(q, k)` is then (SPEC 3.1, 3.2):
  same segment, key valid, and
    clean query -> clean key:  k.block <= q.block          (block-causal, M_BC)
    noisy query -> noisy key:  k.block == q.block          (block-diagonal, M_BD)
    noisy query -> clean key:  k.block <  q.block          (earlier clean blocks, M_OBC)
    clean query -> noisy key:  never.
Inference uses only clean tokens, so it reduces to the block-causal rule; a decode window is just
tokens whose block ids equal the active block (or one shared id for a multi-block window).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Layout:
  """Per-token mask ids, each `[B, T]`."""

  block: jax.Array
  noisy: jax.Array
  segment: jax.Array

  @property
  def shape(self):
    return self.block.shape

  def concat(self, other: "Layout") -> "Layout":
    """Concatenates along the token axis (e.g. cache keys then window keys)."""
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    return Layout(cat(self.block, other.block), cat(self.noisy, other.noisy),
                  cat(self.segment, other.segment))


def _full(shape, value, dtype):
  return jnp.full(shape, value, dtype)


def bidirectional(batch: int, length: int) -> Layout:
  """Every token sees every token."""
  return Layout(_full((batch, length), 0, jnp.int32), _full((batch, length), False, bool),
                _full((batch, length), 0, jnp.int32))


def block_causal(positions: jax.Array, block_length: int, segment=None) -> Layout:
  """Inference canvas: block id = position // block_length. `positions` `[B, T]` int32."""
  positions = jnp.asarray(positions, jnp.int32)
  seg = jnp.zeros_like(positions) if segment is None else jnp.asarray(segment, jnp.int32)
  return Layout(positions // block_length, jnp.zeros(positions.shape, bool), seg)


def from_block_length(batch: int, length: int, block_length: int | None) -> Layout:
  """`block_length=None` is fully bidirectional; otherwise block-causal over `arange(length)`."""
  if block_length is None:
    return bidirectional(batch, length)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return block_causal(pos, block_length)


def training(length: int, block_length: int, segment: jax.Array) -> Layout:
  """The 2L layout `[x_t ; x_0]` of block-diffusion training (SPEC 3.2).

  Args:
    length: L, tokens per half.
    block_length: L_B; must divide L.
    segment: `[B, L]` document ids of the sequence (the same for both halves); -1 = padding.
  Returns: a Layout `[B, 2L]`: first half noisy, second half clean, block = (k mod L) // L_B.
  """
  if length % block_length:
    raise ValueError(f"block_length {block_length} does not divide sequence length {length}")
  batch = segment.shape[0]
  blk = jnp.arange(length, dtype=jnp.int32) // block_length
  blk = jnp.broadcast_to(jnp.concatenate([blk, blk]), (batch, 2 * length))
  noisy = jnp.broadcast_to(jnp.arange(2 * length) < length, (batch, 2 * length))
  seg = jnp.concatenate([segment, segment], axis=1).astype(jnp.int32)
  return Layout(blk, noisy, seg)


def visible(q: Layout, k: Layout) -> jax.Array:
  """Boolean `[B, Tq, Tk]`: query i may attend key j."""
  qb, kb = q.block[:, :, None], k.block[:, None, :]
  qn, kn = q.noisy[:, :, None], k.noisy[:, None, :]
  same_seg = (q.segment[:, :, None] == k.segment[:, None, :]) & (k.segment[:, None, :] >= 0)
  rule = jnp.where(
      qn,
      jnp.where(kn, kb == qb, kb < qb),
      jnp.where(kn, False, kb <= qb))
  return same_seg & rule
