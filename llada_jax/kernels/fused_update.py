"""The fused Mask-to-Token + Token-to-Token update of one denoising step (SPEC 4.2, 4.3), Pallas.

One kernel instance per batch row: from the sampler's top-1 token and probability of every window
position, the current tokens, the mask and editable (non-prompt, decoded) positions and the
thresholds, it writes the new window tokens, the M2T / T2T position masks and the row's counts of
fills and edits. It is bit-identical to `llada_jax.decode.update.update_block` (the jnp
reference): same comparisons on the same float32 values, and the same top-k fallback (when fewer
than `min_fill` masks pass the threshold, the best min(min_fill, #masked) masks by confidence,
ties to the lower index) computed as a rank by pairwise comparison.

Kernel layouts: per-position arrays `[B, 1, W]` (positions in lanes); the confidence and mask
also as columns `[B, W, 1]` so the pairwise rank needs no in-kernel transpose; the per-row
thresholds and fill counts are scalar-prefetch arrays in SMEM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128


def _count(x: jax.Array, axis: int) -> jax.Array:
  """Number of True entries along `axis` (keepdims), as float32: exact for any realistic W, and
  float reductions are the most portable on TPU."""
  return jnp.sum(x.astype(jnp.float32), axis=axis, keepdims=True)


def _update_kernel(thr_ref, edit_thr_ref, fill_ref, old_ref, tok_ref, conf_ref, masked_ref,
                   editable_ref, conf_col_ref, masked_col_ref, new_ref, m2t_ref, t2t_ref,
                   count_ref):
  """One row: row-form refs `[1, W]`, column-form refs `[W, 1]`, count_ref `[1, 128]`."""
  r = pl.program_id(0)
  thr, edit_thr = thr_ref[r], edit_thr_ref[r]
  min_fill = fill_ref[r].astype(jnp.float32)
  old, tok, conf = old_ref[...], tok_ref[...], conf_ref[...]
  masked, editable = masked_ref[...] != 0, editable_ref[...] != 0
  w = old.shape[1]

  # M2T: the masks above the threshold, or (too few of them) the min_fill best masks.
  hi = masked & (conf > thr)
  enough = _count(hi, 1) >= min_fill  # [1, 1]
  score_row = jnp.where(masked, conf, -jnp.inf)  # [1, W]: candidate j
  masked_col = masked_col_ref[...] != 0
  score_col = jnp.where(masked_col, conf_col_ref[...], -jnp.inf)  # [W, 1]: competitor i
  i_idx = lax.broadcasted_iota(jnp.int32, (w, w), 0)
  j_idx = lax.broadcasted_iota(jnp.int32, (w, w), 1)
  better = (score_col > score_row) | ((score_col == score_row) & (i_idx < j_idx))
  rank = _count(better & masked_col, 0)  # [1, W]: masked competitors ranked before j
  top = masked & (rank < min_fill)
  m2t = jnp.where(enough, hi, top)

  # T2T: decoded, editable positions whose prediction changed with enough confidence.
  t2t = (~masked) & editable & (conf > edit_thr) & (tok != old)
  new_ref[...] = jnp.where(m2t | t2t, tok, old)
  m2t_ref[...] = m2t.astype(jnp.int32)
  t2t_ref[...] = t2t.astype(jnp.int32)
  lane = lax.broadcasted_iota(jnp.int32, (1, NUM_LANES), 1)
  n_fill, n_edit = _count(m2t, 1).astype(jnp.int32), _count(t2t, 1).astype(jnp.int32)
  count_ref[...] = jnp.where(lane == 0, n_fill, jnp.where(lane == 1, n_edit, 0))


def _per_row(x, batch: int, dtype) -> jax.Array:
  """A scalar or `[B]` setting as a `[B]` array of `dtype`."""
  return jnp.broadcast_to(jnp.asarray(x, dtype), (batch,))


def fused_update_counts(old, tok, conf, masked, editable, threshold, editing_threshold, min_fill,
                        *, interpret=None):
  """The joint M2T + T2T step and its per-row counts.

  Args: as `llada_jax.decode.update.update_block`: old, tok `[B, W]` int32, conf `[B, W]`
    float32, masked, editable `[B, W]` bool, threshold, editing_threshold scalars or `[B]`,
    min_fill `[B]` int32. interpret: None = automatic (interpret mode unless on TPU).
  Returns: new `[B, W]` int32, m2t `[B, W]` bool, t2t `[B, W]` bool, fills `[B]` int32,
    edits `[B]` int32.
  """
  batch, w = old.shape
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  row = lambda x, dt: jnp.asarray(x).astype(dt).reshape(batch, 1, w)
  col = lambda x, dt: jnp.asarray(x).astype(dt).reshape(batch, w, 1)
  conf = jnp.asarray(conf, jnp.float32)
  row_spec = pl.BlockSpec((None, 1, w), lambda r, *_: (r, 0, 0))
  col_spec = pl.BlockSpec((None, w, 1), lambda r, *_: (r, 0, 0))
  count_spec = pl.BlockSpec((None, 1, NUM_LANES), lambda r, *_: (r, 0, 0))
  i32 = jnp.int32
  new, m2t, t2t, counts = pl.pallas_call(
      _update_kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch,),
          in_specs=[row_spec] * 5 + [col_spec] * 2,
          out_specs=[row_spec] * 3 + [count_spec]),
      out_shape=[jax.ShapeDtypeStruct((batch, 1, w), i32)] * 3
      + [jax.ShapeDtypeStruct((batch, 1, NUM_LANES), i32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name="fused_mask_fill_edit_update",
  )(_per_row(threshold, batch, jnp.float32), _per_row(editing_threshold, batch, jnp.float32),
    _per_row(min_fill, batch, i32),
    row(old, i32), row(tok, i32), row(conf, jnp.float32), row(masked, i32), row(editable, i32),
    col(conf, jnp.float32), col(masked, i32))
  return (new.reshape(batch, w), m2t.reshape(batch, w) != 0, t2t.reshape(batch, w) != 0,
          counts[:, 0, 0], counts[:, 0, 1])


def pallas_update(old, tok, conf, masked, editable, threshold, editing_threshold, min_fill):
  """The `update_impl="pallas"` entry point: same signature and outputs as `update_block`."""
  new, m2t, t2t, _, _ = fused_update_counts(old, tok, conf, masked, editable, threshold,
                                            editing_threshold, min_fill)
  return new, m2t, t2t


def pallas_tpu_update(old, tok, conf, masked, editable, threshold, editing_threshold, min_fill):
  """`update_impl="pallas_tpu"`: always the Mosaic TPU kernel (for TPU export from any host)."""
  new, m2t, t2t, _, _ = fused_update_counts(old, tok, conf, masked, editable, threshold,
                                            editing_threshold, min_fill, interpret=False)
  return new, m2t, t2t

