"""Dense references for the kernels (tests and the work-accounting tool).

`attention_reference` is the math of `llada_jax.model.layers.attention` (re-stated here because
kernel modules import nothing from `llada_jax.model`; it normalises the probabilities before PV,
as the kernel does, where the model's XLA path divides after PV) with the kernel's convention for
rows that see no key (zero output). `exact_tile_kinds` classifies tiles from the dense visibility matrix:
the ground truth that `block_attention.classify_tiles` must approximate conservatively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import masks
from llada_jax.kernels.block_attention import FULL, PARTIAL, SKIP

NEG_INF = -1e30


def attention_reference(q, k, v, q_layout: masks.Layout, k_layout: masks.Layout) -> jax.Array:
  """Dense GQA attention `[B, Tq, H, d]` (float32 scores and softmax, scale d^-0.5) with the
  mask `masks.visible`; rows that see no key are zero (the kernel's convention)."""
  b, tq, h, d = q.shape
  kv = k.shape[2]
  vis = masks.visible(q_layout, k_layout)
  qg = q.reshape(b, tq, kv, h // kv, d)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(vis[:, None, None], scores * (d ** -0.5), NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, tq, h, d)
  return jnp.where(jnp.any(vis, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)


def exact_tile_kinds(q_layout: masks.Layout, k_layout: masks.Layout, block_q: int,
                     block_k: int) -> np.ndarray:
  """SKIP / PARTIAL / FULL `[B, nq, nk]` from the dense mask (padding counts as invisible)."""
  vis = np.asarray(masks.visible(q_layout, k_layout))
  b, tq, tk = vis.shape
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  padded = np.zeros((b, nq * block_q, nk * block_k), bool)
  padded[:, :tq, :tk] = vis
  tiles = padded.reshape(b, nq, block_q, nk, block_k)
  any_ = tiles.any(axis=(2, 4))
  all_ = tiles.all(axis=(2, 4))
  return np.where(all_, FULL, np.where(any_, PARTIAL, SKIP)).astype(np.int32)
