"""Greedy sampling fused with the LM head, Pallas TPU (SPEC 4.1, temperature 0).

From the final-normed hidden states `[N, D]` and `lm_head` `[D, V]` the kernel computes, for each
row, the argmax token of the logits and its softmax probability (the greedy sampler's confidence)
without writing the `[N, V]` logits anywhere: grid (row tiles, vocabulary tiles), the vocabulary
axis innermost ("arbitrary"); each step multiplies one `[tm, D]` row tile by one `[D, tv]` column
tile of `lm_head` into a `[tm, tv]` float32 logits tile in VMEM and folds it into three
accumulators kept in VMEM scratch across the vocabulary axis: the running max, its first argmax
(ties to the lower id, like `jnp.argmax`) and the running sum of exp(logit - max), rescaled when
the max grows (online softmax). The last vocabulary step writes token = argmax and confidence
= 1 / sum (= exp(max - max) / sum, what `jax.nn.softmax` gives at the argmax).

The jnp reference is `llada_jax.decode.update.sample` (greedy) on `head_logits(hidden, lm_head)`;
the XLA version of the same scheme is `update.greedy_tiled`. Logits are rounded to the model
dtype before float32 as the reference's `jnp.dot(x, lm_head).astype(float32)` does (bf16 models).
Columns past V (a partial last tile) are -inf.

Layouts: accumulators and outputs are `[tm, 128]` with the value repeated over the lanes (as the
Pallas TPU flash attention keeps its m / l); the wrapper takes lane 0.

Sampling with temperature (top-k / top-p) is not in the kernel: `pallas_sampler` runs
`update.sample_tiled` (XLA over vocabulary tiles) for it.

The M2T / T2T update (`kernels.fused_update`, `update_impl="pallas"`) is deliberately not folded
in: it reads and writes `[B, W]` arrays only (kilobytes, against the `[D, V]` lm_head this kernel
streams), its top-k fallback ranks all W positions of a batch row, which would tie the row tiles
here to whole windows and need the old tokens, masks and thresholds as extra operands, and it
would only serve the greedy path. XLA fuses the jnp `update_block` into a few small fusions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128
DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_VOCAB = 1024
_BIG = jnp.iinfo(jnp.int32).max


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _greedy_head_kernel(h_ref, w_ref, tok_ref, conf_ref, m_sc, s_sc, i_sc, *, vocab: int,
                        block_vocab: int, logits_dtype):
  """h_ref `[tm, D]`, w_ref `[D, tv]`; outputs and scratch `[tm, 128]` (lanes repeated)."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
    i_sc[...] = jnp.zeros(i_sc.shape, jnp.int32)

  logits = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  if jnp.dtype(logits_dtype) != jnp.float32:
    logits = logits.astype(logits_dtype).astype(jnp.float32)
  cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  logits = jnp.where(cols < vocab, logits, -jnp.inf)
  t_max = jnp.max(logits, axis=1, keepdims=True)  # [tm, 1]
  t_arg = jnp.min(jnp.where(logits == t_max, cols, _BIG), axis=1, keepdims=True)
  m_prev = m_sc[...]
  m_next = jnp.maximum(m_prev, t_max)  # [tm, 128]
  p_sum = jnp.sum(jnp.exp(logits - m_next[:, :1]), axis=1, keepdims=True)
  s_sc[...] = s_sc[...] * jnp.exp(m_prev - m_next) + p_sum
  i_sc[...] = jnp.where(t_max > m_prev, t_arg, i_sc[...])  # strict: earlier tiles keep ties
  m_sc[...] = m_next

  @pl.when(j == pl.num_programs(1) - 1)
  def _write():
    tok_ref[...] = i_sc[...]
    conf_ref[...] = 1.0 / s_sc[...]


def greedy_head(hidden: jax.Array, lm_head: jax.Array, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                block_vocab: int = DEFAULT_BLOCK_VOCAB, interpret=None
                ) -> tuple[jax.Array, jax.Array]:
  """Greedy token and confidence of `hidden @ lm_head` without materialising the logits.

  Args:
    hidden: `[..., D]` final-normed hidden states (model dtype). lm_head: `[D, V]`.
    block_rows: rows per tile (rounded to the sublane tile; all rows when fewer).
    block_vocab: vocabulary ids per tile (a multiple of 128; V needs no padding).
    interpret: None = automatic (interpret mode unless the backend is TPU), a bool, or a
      `pltpu.InterpretParams`.
  Returns: tokens `[...]` int32, confidence `[...]` float32.
  """
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  lead, d = hidden.shape[:-1], hidden.shape[-1]
  v = lm_head.shape[1]
  logits_dtype = jnp.result_type(hidden.dtype, lm_head.dtype)
  h = hidden.reshape(-1, d)
  n = h.shape[0]
  sub = 16 if min(jnp.dtype(h.dtype).itemsize, jnp.dtype(lm_head.dtype).itemsize) < 4 else 8
  tm = min(_round_up(block_rows, sub), _round_up(n, sub))
  n_pad = _round_up(n, tm)
  if n_pad != n:
    h = jnp.pad(h, ((0, n_pad - n), (0, 0)))
  tv = min(_round_up(block_vocab, NUM_LANES), _round_up(v, NUM_LANES))
  grid = (n_pad // tm, pl.cdiv(v, tv))
  out_spec = pl.BlockSpec((tm, NUM_LANES), lambda i, j: (i, 0))
  kernel = functools.partial(_greedy_head_kernel, vocab=v, block_vocab=tv,
                             logits_dtype=logits_dtype)
  tok, conf = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=grid,
          in_specs=[pl.BlockSpec((tm, d), lambda i, j: (i, 0)),
                    pl.BlockSpec((d, tv), lambda i, j: (0, j))],
          out_specs=[out_spec, out_spec],
          scratch_shapes=[pltpu.VMEM((tm, NUM_LANES), jnp.float32),
                          pltpu.VMEM((tm, NUM_LANES), jnp.float32),
                          pltpu.VMEM((tm, NUM_LANES), jnp.int32)]),
      out_shape=[jax.ShapeDtypeStruct((n_pad, NUM_LANES), jnp.int32),
                 jax.ShapeDtypeStruct((n_pad, NUM_LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="greedy_lm_head_sampler",
  )(h, lm_head)
  return tok[:n, 0].reshape(lead), conf[:n, 0].reshape(lead)


def _sampler(hidden, lm_head, key, temperature, top_k, top_p, *, greedy, interpret):
  if greedy:
    return greedy_head(hidden, lm_head, interpret=interpret)
  from llada_jax.decode.update import sample_tiled  # noqa: PLC0415 (decode imports kernels lazily)
  return sample_tiled(hidden, lm_head, key, temperature, top_k, top_p, greedy=False)


def pallas_sampler(hidden, lm_head, key, temperature, top_k, top_p, *, greedy):
  """`sampler_impl="pallas"`: greedy with the kernel (interpret mode unless on TPU), sampling
  with `update.sample_tiled`. Signature as the other sampler implementations."""
  return _sampler(hidden, lm_head, key, temperature, top_k, top_p, greedy=greedy, interpret=None)


def pallas_tpu_sampler(hidden, lm_head, key, temperature, top_k, top_p, *, greedy):
  """`sampler_impl="pallas_tpu"`: the kernel always lowered with Mosaic (TPU export)."""
  return _sampler(hidden, lm_head, key, temperature, top_k, top_p, greedy=greedy,
                  interpret=False)
