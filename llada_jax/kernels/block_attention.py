"""Block-diffusion flash attention for TPU (Pallas): forward and backward with tile skipping.

One kernel covers every LLaDA2 mask (SPEC 3) because visibility is computed from the per-token
ids of `masks.Layout` (block, noisy, segment), the single source of the mask rules:
  inference   queries = the active block / MBE window, keys = KV-cache slots + the window
              (the cache as its own K/V operands, read in place: see "KV cache" below);
  training    the 2L layout [x_t ; x_0] with document (segment) masks;
  plain       block-causal or bidirectional forwards.

Tiling. Queries are cut in tiles of `block_q` tokens, keys in tiles of `block_k` tokens. Before
the kernels run, every (q tile, k tile) pair is classified from per-tile min/max summaries of the
ids (`tile_kinds`):
  SKIP     no query of the tile sees any key of the tile: no compute, no DMA;
  FULL     every query sees every key: the mask arithmetic is skipped;
  PARTIAL  the mask is computed in-kernel from the per-token ids.
For each q tile the non-skipped k tiles are listed first (`plan`, a scalar-prefetch array in
SMEM); the remaining grid steps repeat the last listed tile index, so the pipeline issues no new
DMA for them and the kernel body does nothing (`pl.when`). The backward dK/dV kernel uses the
transposed plan (for each k tile, the q tiles that see it).

GQA: the `H // KV` query heads that share one KV head are processed together: their queries are
stacked into the rows of one matmul against the shared K/V tile (which is fetched once).

Numerics: scores and softmax in float32 with scale d^-0.5, probabilities cast to the value dtype
for the PV matmul, accumulation in float32 (`model.layers.attention` casts the unnormalised
exponentials instead and divides after PV: equal up to rounding). A query that sees no
key at all (padding, unwritten window slots) gets an all-zero output and zero gradients (the
dense reference gives it a uniform, meaningless row instead).

Kernel layouts (after the wrapper pads and transposes):
  q, o, do       [B, KV, G, Tq, d]        k, v, dk, dv  [B, KV, Tk, d]
  lse (forward)  [B, KV, G, Tq, 128] f32  (lane-replicated per-row scalars; a transient output,
                 sliced to its first lane right away)
  lse, di rows   [B, KV, nq, 1, G * bq] f32 for the backward kernels: compact (one float per
                 query row), ordered so that one block holds a q tile's G stacked heads; the
                 kernels turn the lane vector into the column they subtract (as JAX's splash
                 attention does with its [.., 1, T] log-sum-exp and di rows)
  q ids          [B, Tq, 256] int32: lanes 0-127 = 2 * block + noisy, lanes 128-255 = segment
                 (each replicated across its 128 lanes, like the segment ids of JAX's kernels)
  k ids          [B, 16, Tk] int32: sublanes 0-7 = 2 * block + noisy, 8-15 = segment
Only tile-aligned slices of the id blocks are taken in-kernel (lane / sublane offset 0).

Residuals (what the forward keeps for the backward, per layer): q, k, v, o, the compact
log-sum-exp `[B, KV, G, Tq]` f32 and the compact ids `[B, T]` (the lane-replicated kernel ids
and rows are rebuilt in the backward): for LLaDA2.1-mini's 2L layout of 8192 tokens, 80.7 MiB
per layer and device instead of 152.5 MiB (`tools/attention_residuals.py`).

KV cache (decoding, forward only): `cache_k`, `cache_v` `[L, B, KV, S, d]` (the layout of
`model.kv_cache`: the whole stacked cache of a layer stack, `cache_index` the layer) are a
second pair of K/V operands next to the window's k, v. The k-tile loop runs over the cache
tiles (`block_k_cache` slots each, a divisor of S) and then the window tiles, each step reading
from the ref its tile belongs to; one plan covers both (cache tiles classified against
`cache_layout`, dead slots -> SKIP, no DMA). The layer and KV head of a cache tile are chosen
by the index map (scalar prefetch), so nothing of the cache is sliced, concatenated, padded or
transposed outside the kernel: a decode step reads the live cache tiles once per layer.

Meshes: with a multi-device mesh in context (`jax.set_mesh`, or an abstract mesh for export)
the kernel runs inside `jax.shard_map`, batch split over the batch axes and heads over `tensor`
(`sharded_attention.shard_attention`): Mosaic calls cannot be partitioned by GSPMD.

Limits: no gradients with cache operands (decoding only). The step tables live in SMEM (1 MiB
on TPU): 4 * B * nq * nk bytes per kernel, e.g. 256 KiB per batch row for the 2L layout of a
32k context with the default tiles (a warning is issued above 512 KiB). Ids must satisfy
|block| < 2^30.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llada_jax import masks
from llada_jax.kernels.sharded_attention import shard_attention

NUM_LANES = 128
NUM_SUBLANES = 8
NEG_INF = -1e30  # = model.layers.NEG_INF: the finite "minus infinity" of masked scores
DEAD_LSE = 1e30  # log-sum-exp stored for rows that see no key: exp(s - DEAD_LSE) = 0
SMEM_PLAN_BUDGET = 512 * 1024  # bytes of the 1 MiB TPU SMEM we let one step table take
SKIP, PARTIAL, FULL = 0, 1, 2
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (tokens). On TPU: block_q a multiple of 8 (16 for bf16), block_k a multiple of
  128, unless a tile covers the whole (padded) axis. Interpret mode accepts any sizes."""

  block_q: int
  block_k: int
  block_k_cache: int | None = None  # cache tile (slots); None: `cache_tile` picks one

  @classmethod
  def default(cls, q_len: int, k_len: int, dtype=jnp.float32, groups: int = 1) -> "BlockSizes":
    """About 512 stacked query rows (G heads x block_q) and 512 keys per tile: the float32
    score tile is 1 MiB, well inside the default VMEM budget with double-buffered inputs.
    Up to 128 keys (a decode window, a short prompt) are one whole-axis tile padded to the
    sublane multiple only, not to 128 lanes: no padded copy larger than the keys."""
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else NUM_SUBLANES
    block_q = max(sub, min(256, (512 // groups) // sub * sub))
    block_q = min(block_q, _round_up(q_len, sub))
    if k_len <= NUM_LANES:
      return cls(block_q, _round_up(k_len, sub))
    block_k = min(512, _round_up(k_len, NUM_LANES))
    return cls(block_q, block_k)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static configuration of one attention call (hashable: a custom_vjp nondiff argument)."""

  block_q: int
  block_k: int
  num_q_tiles: int
  num_k_tiles: int
  scale: float
  interpret: object  # False, True, or a pltpu.InterpretParams
  num_cache_tiles: int = 0  # with cache operands: the first num_cache_tiles k tiles are cache
  block_kc: int = 0  # ... of block_kc slots; the window's tiles follow (block_k each)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def cache_tile(slots: int, preferred: int | None = None, interpret=False) -> int:
  """Slots per cache key tile for a cache of `slots` slots: `preferred` if it divides them,
  else the largest of 512, 256, 128 that does, else the whole cache up to 512 slots (a block
  equal to the full axis is allowed on TPU); in interpret mode any divisor. `kv_cache.capacity`
  allocates slot counts that always have one."""
  for t in ([preferred] if preferred else []) + [512, 256, 128]:
    if slots % t == 0 and (t % NUM_LANES == 0 or t == preferred or interpret is not False):
      return t
  if slots <= 512:
    return slots
  if interpret is not False:
    return max(t for t in range(1, 513) if slots % t == 0)
  raise ValueError(f"a KV cache of {slots} slots has no key tile (a multiple of 128 up to 512 "
                   "dividing it): allocate kv_cache.capacity(length) slots")


def default_interpret() -> bool:
  """Interpret mode everywhere but on TPU."""
  return jax.default_backend() != "tpu"


# ----------------------------------------------------------------------------------------------
# Visibility: the rule of `masks.visible`, elementwise on broadcastable ids.
# ----------------------------------------------------------------------------------------------

def visible_ids(qb, qn, qs, kb, kn, ks) -> jax.Array:
  """`masks.visible` on broadcastable id arrays (block, noisy as int/bool, segment).

  Same segment, key valid (segment >= 0), and clean->clean kb <= qb, noisy->noisy kb == qb,
  noisy->clean kb < qb, clean->noisy never. Written with logical ops only (TPU friendly);
  `tests/test_kernels_attention.py` checks it equals `masks.visible` on every id combination.
  """
  qn, kn = qn != 0, kn != 0
  rule = ((qn & kn & (kb == qb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb)))
  return (qs == ks) & (ks >= 0) & rule


def _lanes(x: jax.Array, n: int) -> jax.Array:
  """Lane-replicated `[R, 128]` -> `[R, n]` (tiles on TPU, where n is a multiple of 128 or the
  whole axis; other widths only occur with small interpret-mode tiles)."""
  if n == NUM_LANES:
    return x
  if n % NUM_LANES == 0:
    return jnp.tile(x, (1, n // NUM_LANES))
  if n < NUM_LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _tile_visible(qid_ref, kid_ref) -> jax.Array:
  """`[block_q, block_k]` bool mask of one tile from the id blocks in VMEM."""
  bk = kid_ref.shape[1]
  qi, ki = qid_ref[...], kid_ref[...]
  q_bn, q_seg = _lanes(qi[:, :NUM_LANES], bk), _lanes(qi[:, NUM_LANES:], bk)
  k_bn, k_seg = ki[0:1, :], ki[NUM_SUBLANES:NUM_SUBLANES + 1, :]
  return visible_ids(q_bn >> 1, q_bn & 1, q_seg, k_bn >> 1, k_bn & 1, k_seg)


def _where_rows(vis: jax.Array, x: jax.Array, fill: float, groups: int) -> jax.Array:
  """`where(vis, x, fill)` for x `[G * bq, bk]` (G head groups stacked in rows), vis `[bq, bk]`."""
  if groups == 1:
    return jnp.where(vis, x, fill)
  bq, bk = vis.shape
  return jnp.where(vis[None], x.reshape(groups, bq, bk), fill).reshape(groups * bq, bk)


# ----------------------------------------------------------------------------------------------
# Tile classification and plans (XLA, outside the kernels).
# ----------------------------------------------------------------------------------------------

def _pad_ids(layout: masks.Layout, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(block, noisy, segment) int32 `[B, length]`, padded with segment -1 (visible to no one)."""
  t = layout.block.shape[1]
  pad = lambda x, v: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, length - t)), constant_values=v)
  return pad(layout.block, 0), pad(layout.noisy, 0), pad(layout.segment, -1)


def _summaries(ids, tile: int):
  """Per-tile (min, max) of each id array `[B, n * tile]` -> `[B, n]` pairs."""
  out = []
  for x in ids:
    x = x.reshape(x.shape[0], -1, tile)
    out.append((x.min(-1), x.max(-1)))
  return out


def classify_tiles(q_ids, k_ids, block_q: int, block_k: int) -> jax.Array:
  """SKIP / PARTIAL / FULL `[B, nq, nk]` int32 from padded ids (see `_pad_ids`).

  Conservative: SKIP only if no (q, k) pair of the tile can be visible, FULL only if every pair
  is, judged from per-tile ranges of the ids (exact for tiles inside one block / document).
  """
  (qb_lo, qb_hi), (qn_lo, qn_hi), (qs_lo, qs_hi) = [
      (lo[:, :, None], hi[:, :, None]) for lo, hi in _summaries(q_ids, block_q)]
  (kb_lo, kb_hi), (kn_lo, kn_hi), (ks_lo, ks_hi) = [
      (lo[:, None, :], hi[:, None, :]) for lo, hi in _summaries(k_ids, block_k)]
  seg_any = (ks_hi >= 0) & (qs_hi >= jnp.maximum(ks_lo, 0)) & (qs_lo <= ks_hi)
  seg_all = (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo) & (ks_lo >= 0)
  q_clean, q_noisy = qn_lo == 0, qn_hi != 0  # which kinds of token the tile holds
  k_clean, k_noisy = kn_lo == 0, kn_hi != 0
  cc, nn, nc, cn = q_clean & k_clean, q_noisy & k_noisy, q_noisy & k_clean, q_clean & k_noisy
  rule_any = ((cc & (kb_lo <= qb_hi)) | (nn & (kb_lo <= qb_hi) & (qb_lo <= kb_hi))
              | (nc & (kb_lo < qb_hi)))
  rule_all = ((~cc | (kb_hi <= qb_lo)) & (~nn | ((kb_lo == kb_hi) & (qb_lo == qb_hi)
                                                & (kb_lo == qb_lo)))
              & (~nc | (kb_hi < qb_lo)) & ~cn)
  return jnp.where(seg_any & rule_any, jnp.where(seg_all & rule_all, FULL, PARTIAL),
                   SKIP).astype(jnp.int32)


def _kernel_ids(ids, copies: int, axis: int) -> jax.Array:
  """(block, noisy, segment) `[B, T]` -> the kernels' id array: 2 * block + noisy and segment,
  each repeated `copies` times along a new `axis` (-1: `[B, T, 2c]`, 1: `[B, 2c, T]`)."""
  block, noisy, seg = ids
  parts = [jnp.repeat(jnp.expand_dims(x, axis), copies, axis=axis)
           for x in (2 * block + noisy, seg)]
  return jnp.concatenate(parts, axis=axis)


def tile_kinds(q_layout: masks.Layout, k_layout: masks.Layout, block_q: int,
               block_k: int) -> jax.Array:
  """`classify_tiles` for unpadded layouts (pads to whole tiles). `[B, nq, nk]` int32."""
  tq = _round_up(q_layout.block.shape[1], block_q)
  tk = _round_up(k_layout.block.shape[1], block_k)
  return classify_tiles(_pad_ids(q_layout, tq), _pad_ids(k_layout, tk), block_q, block_k)


def make_plan(kinds: jax.Array) -> jax.Array:
  """Flat `[B * n1 * n2]` int32 step table: entry (b, i, j) = tile_index * 4 + kind.

  For each (b, i) the non-skipped tiles come first in index order; later steps repeat the last
  one (kind SKIP), so their index map returns the resident tile and no DMA is issued.
  """
  n2 = kinds.shape[-1]
  live = kinds != SKIP
  order = jnp.argsort((~live).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)
  count = jnp.sum(live, axis=-1, keepdims=True)
  steps = jnp.arange(n2, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0), axis=-1)
  idx = jnp.where(steps < count, order, last)
  kind = jnp.where(steps < count, jnp.take_along_axis(kinds, order, axis=-1), SKIP)
  return (idx * 4 + kind).reshape(-1).astype(jnp.int32)


def _step(plan_ref, b, i, j, n_i: int, n_j: int):
  """(tile index, kind) of grid step j of row-tile i in batch row b."""
  entry = plan_ref[(b * n_i + i) * n_j + j]
  return lax.shift_right_logical(entry, 2), entry & 3  # entries are >= 0


# ----------------------------------------------------------------------------------------------
# Forward kernel.
# ----------------------------------------------------------------------------------------------

def _init_softmax(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def _accumulate(q_ref, k_ref, v_ref, qid_ref, kid_ref, m_sc, l_sc, acc_sc, masked: bool,
                cfg: _Cfg):
  """One online-softmax step of the stacked query rows against one K/V tile."""
  g, bq, d = q_ref.shape
  rows = g * bq
  q = q_ref[...].reshape(rows, d)
  s = lax.dot_general(q, k_ref[...], NT_DIMS, preferred_element_type=jnp.float32)
  s = s * cfg.scale
  vis = _tile_visible(qid_ref, kid_ref) if masked else None
  if masked:
    s = _where_rows(vis, s, NEG_INF, g)
  m_prev = m_sc[...]
  m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
  p = jnp.exp(s - _lanes(m_next, s.shape[1]))
  if masked:  # rows with nothing visible so far would otherwise get exp(0) = 1
    p = _where_rows(vis, p, 0.0, g)
  alpha = jnp.exp(m_prev - m_next)
  l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
  m_sc[...] = m_next
  pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], NN_DIMS,
                       preferred_element_type=jnp.float32)
  acc_sc[...] = _lanes(alpha, d) * acc_sc[...] + pv


def _finalize_softmax(o_ref, lse_ref, m_sc, l_sc, acc_sc):
  """Writes o (and the log-sum-exp when `lse_ref` is given) from the online-softmax state."""
  g, bq, d = o_ref.shape
  l, m = l_sc[...], m_sc[...]
  dead = l == 0.0
  safe_l = jnp.where(dead, 1.0, l)
  o = acc_sc[...] / _lanes(safe_l, d)
  o_ref[...] = o.reshape(g, bq, d).astype(o_ref.dtype)
  if lse_ref is not None:
    lse = jnp.where(dead, DEAD_LSE, m + jnp.log(safe_l))
    lse_ref[...] = lse.reshape(g, bq, NUM_LANES)


def _fwd_kernel(plan_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, cfg: _Cfg):
  """One (batch, kv head, q tile, step) grid point. q_ref `[G, bq, d]`, k/v `[bk, d]`,
  scratch m/l `[G*bq, 128]`, acc `[G*bq, d]` (float32 online-softmax state)."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  _, kind = _step(plan_ref, b, i, j, cfg.num_q_tiles, cfg.num_k_tiles)
  state = (m_sc, l_sc, acc_sc)
  pl.when(j == 0)(lambda: _init_softmax(*state))
  acc = functools.partial(_accumulate, q_ref, k_ref, v_ref, qid_ref, kid_ref, *state, cfg=cfg)
  pl.when(kind == FULL)(lambda: acc(False))
  pl.when(kind == PARTIAL)(lambda: acc(True))
  pl.when(j == cfg.num_k_tiles - 1)(lambda: _finalize_softmax(o_ref, lse_ref, *state))


def _fwd_cache_kernel(plan_ref, last_ref, layer_ref, heads_ref, q_ref, ck_ref, cv_ref, k_ref,
                      v_ref, qid_ref, ckid_ref, kid_ref, o_ref, m_sc, l_sc, acc_sc, *,
                      cfg: _Cfg):
  """The forward with the KV cache as separate operands: steps over cache tiles (ck/cv
  `[block_kc, d]`, ids ckid) then window tiles (k/v `[block_k, d]`, ids kid), in the plan's
  order; each step accumulates from the refs of its tile's source."""
  del last_ref, layer_ref, heads_ref  # used by the index maps
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  tile, kind = _step(plan_ref, b, i, j, cfg.num_q_tiles, cfg.num_k_tiles)
  in_cache = tile < cfg.num_cache_tiles
  state = (m_sc, l_sc, acc_sc)
  pl.when(j == 0)(lambda: _init_softmax(*state))
  from_cache = functools.partial(_accumulate, q_ref, ck_ref, cv_ref, qid_ref, ckid_ref, *state,
                                 cfg=cfg)
  from_window = functools.partial(_accumulate, q_ref, k_ref, v_ref, qid_ref, kid_ref, *state,
                                  cfg=cfg)
  pl.when((kind == FULL) & in_cache)(lambda: from_cache(False))
  pl.when((kind == PARTIAL) & in_cache)(lambda: from_cache(True))
  pl.when((kind == FULL) & ~in_cache)(lambda: from_window(False))
  pl.when((kind == PARTIAL) & ~in_cache)(lambda: from_window(True))
  pl.when(j == cfg.num_k_tiles - 1)(lambda: _finalize_softmax(o_ref, None, *state))


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(q, k, v, q_ids, k_ids, plan, cfg: _Cfg, with_lse: bool = True):
  """Kernel-layout forward: returns o `[B, KV, G, Tq, d]` and lse `[B, KV, G, Tq, 128]` (None
  with `with_lse=False`: the primal call outside of differentiation writes no lse)."""
  batch, kvh, g, tq, d = q.shape
  bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.num_q_tiles, cfg.num_k_tiles

  def kv_tile(b, i, j, plan_ref):
    return _step(plan_ref, b, i, j, nq, nk)[0]

  q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b, h, i, j, p: (b, h, 0, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, p: (b, h, kv_tile(b, i, j, p), 0))
  qid_spec = pl.BlockSpec((None, bq, 2 * NUM_LANES), lambda b, h, i, j, p: (b, i, 0))
  kid_spec = pl.BlockSpec((None, 2 * NUM_SUBLANES, bk),
                          lambda b, h, i, j, p: (b, 0, kv_tile(b, i, j, p)))
  lse_spec = pl.BlockSpec((None, None, g, bq, NUM_LANES), lambda b, h, i, j, p: (b, h, 0, i, 0))
  rows = g * bq
  out_specs = [q_spec, lse_spec]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, kvh, g, tq, NUM_LANES), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, cfg=cfg)
  if not with_lse:
    out_specs, out_shape = out_specs[:1], out_shape[:1]
    kernel = lambda *refs: _fwd_kernel(*refs[:7], None, *refs[7:], cfg=cfg)  # noqa: E731
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, kvh, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, qid_spec, kid_spec],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                          pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=_compiler_params(),
      interpret=cfg.interpret,
      name="block_diffusion_attention_fwd",
  )(plan, q, k, v, q_ids, k_ids)
  return out if with_lse else (out[0], None)


def _forward_cached(q, ck, cv, k, v, q_ids, ck_ids, k_ids, plan, last, layer, heads,
                    cfg: _Cfg):
  """Kernel-layout forward against the cache: q `[B, KVg, G, Tq, d]`, ck/cv `[L, B, KVc, S, d]`
  (read in place: layer `layer[0]`, KV head `heads[h]` for grid head h), k/v
  `[B, KVg, Tw, d]`, ids as in `_forward` (ck_ids `[B, 16, S]`), plan over nkc + nkw k tiles,
  last `[B * nq]` the last live cache tile per q tile. Returns o `[B, KVg, G, Tq, d]`."""
  batch, kvh, g, tq, d = q.shape
  bq, bk, bkc = cfg.block_q, cfg.block_k, cfg.block_kc
  nq, ns, nkc = cfg.num_q_tiles, cfg.num_k_tiles, cfg.num_cache_tiles

  def tile(b, i, j, plan_ref):
    return _step(plan_ref, b, i, j, nq, ns)[0]

  def cache_tile_of(b, i, j, plan_ref, last_ref):
    # Window steps keep the last live cache tile resident: no DMA for the cache then.
    t = tile(b, i, j, plan_ref)
    return jnp.where(t < nkc, t, last_ref[b * nq + i])

  def window_tile_of(b, i, j, plan_ref):
    # Cache steps keep window tile 0 resident (fetched once per q tile).
    return jnp.maximum(tile(b, i, j, plan_ref) - nkc, 0)

  q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b, h, i, j, p, l, ly, hd: (b, h, 0, i, 0))
  c_spec = pl.BlockSpec((None, None, None, bkc, d), lambda b, h, i, j, p, l, ly, hd: (
      ly[0], b, hd[h], cache_tile_of(b, i, j, p, l), 0))
  w_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, p, l, ly, hd: (
      b, h, window_tile_of(b, i, j, p), 0))
  qid_spec = pl.BlockSpec((None, bq, 2 * NUM_LANES), lambda b, h, i, j, p, l, ly, hd: (b, i, 0))
  cid_spec = pl.BlockSpec((None, 2 * NUM_SUBLANES, bkc), lambda b, h, i, j, p, l, ly, hd: (
      b, 0, cache_tile_of(b, i, j, p, l)))
  wid_spec = pl.BlockSpec((None, 2 * NUM_SUBLANES, bk), lambda b, h, i, j, p, l, ly, hd: (
      b, 0, window_tile_of(b, i, j, p)))
  rows = g * bq
  return pl.pallas_call(
      functools.partial(_fwd_cache_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, kvh, nq, ns),
          in_specs=[q_spec, c_spec, c_spec, w_spec, w_spec, qid_spec, cid_spec, wid_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                          pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(),
      interpret=cfg.interpret,
      name="block_diffusion_attention_cache_fwd",
  )(plan, last, layer, heads, q, ck, cv, k, v, q_ids, ck_ids, k_ids)


# ----------------------------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------------------------

def _column(row_ref) -> jax.Array:
  """A compact `[1, R]` block of per-row scalars (lse or di rows of G*bq stacked query rows)
  -> the `[R, 1]` column broadcast against a `[R, bk]` tile (a lane -> sublane relayout, as in
  the splash attention kernels)."""
  return jnp.expand_dims(row_ref[0], -1)


def _probs_and_ds(q, k, v, do, lse, di, vis, cfg: _Cfg, groups: int):
  """Recomputes p `[R, bk]` (R = G*bq stacked rows) and ds = p * (dp - di) for one tile;
  lse, di are `[R, 1]` columns."""
  s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
  p = jnp.exp(s - lse)
  if vis is not None:
    p = _where_rows(vis, p, 0.0, groups)
  dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
  return p, p * (dp - di)


def _dq_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qid_ref, kid_ref,
               dq_ref, dq_sc, *, cfg: _Cfg):
  """dq for one (batch, kv head, q tile) accumulated over the planned k tiles."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  _, kind = _step(plan_ref, b, i, j, cfg.num_q_tiles, cfg.num_k_tiles)
  g, bq, d = q_ref.shape
  rows = g * bq

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def accumulate(masked: bool):
    vis = _tile_visible(qid_ref, kid_ref) if masked else None
    k = k_ref[...]
    _, ds = _probs_and_ds(q_ref[...].reshape(rows, d), k, v_ref[...],
                          do_ref[...].reshape(rows, d), _column(lse_ref), _column(di_ref), vis,
                          cfg, g)
    dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS,
                                  preferred_element_type=jnp.float32)

  pl.when(kind == FULL)(lambda: accumulate(False))
  pl.when(kind == PARTIAL)(lambda: accumulate(True))

  @pl.when(j == cfg.num_k_tiles - 1)
  def _finalize():
    dq_ref[...] = (dq_sc[...] * cfg.scale).reshape(g, bq, d).astype(dq_ref.dtype)


def _dkv_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qid_ref, kid_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: _Cfg):
  """dk, dv for one (batch, kv head, k tile), summed over the G heads and the planned q tiles."""
  b, kj, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  _, kind = _step(plan_ref, b, kj, i, cfg.num_k_tiles, cfg.num_q_tiles)
  g, bq, d = q_ref.shape
  rows = g * bq

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def accumulate(masked: bool):
    vis = _tile_visible(qid_ref, kid_ref) if masked else None
    q, do = q_ref[...].reshape(rows, d), do_ref[...].reshape(rows, d)
    p, ds = _probs_and_ds(q, k_ref[...], v_ref[...], do, _column(lse_ref), _column(di_ref),
                          vis, cfg, g)
    dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  pl.when(kind == FULL)(lambda: accumulate(False))
  pl.when(kind == PARTIAL)(lambda: accumulate(True))

  @pl.when(i == cfg.num_q_tiles - 1)
  def _finalize():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _row_tiles(x: jax.Array, block_q: int) -> jax.Array:
  """Per-row scalars `[B, KV, G, Tq]` -> `[B, KV, nq, 1, G * block_q]`: the G heads' rows of
  each q tile contiguous (the kernels' stacked row order), one block per q tile."""
  b, kvh, g, tq = x.shape
  nq = tq // block_q
  x = x.reshape(b, kvh, g, nq, block_q).transpose(0, 1, 3, 2, 4)
  return x.reshape(b, kvh, nq, 1, g * block_q)


def _backward(q, k, v, o, lse, do, q_ids, k_ids, plan, plan_t, cfg: _Cfg):
  """Kernel-layout backward: (dq, dk, dv) in the layouts of (q, k, v); lse `[B, KV, G, Tq]`
  f32 (compact)."""
  batch, kvh, g, tq, d = q.shape
  tk = k.shape[2]
  bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.num_q_tiles, cfg.num_k_tiles
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, KV, G, Tq]
  lse, di = _row_tiles(lse, bq), _row_tiles(di, bq)
  rows = g * bq

  # dq: grid over (batch, kv head, q tile, step over k tiles), the forward plan.
  kv_tile = lambda b, i, j, p: _step(p, b, i, j, nq, nk)[0]
  q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b, h, i, j, p: (b, h, 0, i, 0))
  row_spec = pl.BlockSpec((None, None, None, 1, rows), lambda b, h, i, j, p: (b, h, i, 0, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, p: (b, h, kv_tile(b, i, j, p), 0))
  qid_spec = pl.BlockSpec((None, bq, 2 * NUM_LANES), lambda b, h, i, j, p: (b, i, 0))
  kid_spec = pl.BlockSpec((None, 2 * NUM_SUBLANES, bk),
                          lambda b, h, i, j, p: (b, 0, kv_tile(b, i, j, p)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, kvh, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qid_spec, kid_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((rows, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(),
      interpret=cfg.interpret,
      name="block_diffusion_attention_dq",
  )(plan, q, k, v, do, lse, di, q_ids, k_ids)

  # dk, dv: grid over (batch, kv head, k tile, step over q tiles), the transposed plan.
  q_tile = lambda b, kj, i, p: _step(p, b, kj, i, nk, nq)[0]
  q_spec_t = pl.BlockSpec((None, None, g, bq, d),
                          lambda b, h, kj, i, p: (b, h, 0, q_tile(b, kj, i, p), 0))
  row_spec_t = pl.BlockSpec((None, None, None, 1, rows),
                            lambda b, h, kj, i, p: (b, h, q_tile(b, kj, i, p), 0, 0))
  kv_spec_t = pl.BlockSpec((None, None, bk, d), lambda b, h, kj, i, p: (b, h, kj, 0))
  qid_spec_t = pl.BlockSpec((None, bq, 2 * NUM_LANES),
                            lambda b, h, kj, i, p: (b, q_tile(b, kj, i, p), 0))
  kid_spec_t = pl.BlockSpec((None, 2 * NUM_SUBLANES, bk), lambda b, h, kj, i, p: (b, 0, kj))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, kvh, nk, nq),
          in_specs=[q_spec_t, kv_spec_t, kv_spec_t, q_spec_t, row_spec_t, row_spec_t,
                    qid_spec_t, kid_spec_t],
          out_specs=[kv_spec_t, kv_spec_t],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, kvh, tk, d), k.dtype),
                 jax.ShapeDtypeStruct((batch, kvh, tk, d), v.dtype)],
      compiler_params=_compiler_params(),
      interpret=cfg.interpret,
      name="block_diffusion_attention_dkv",
  )(plan_t, q, k, v, do, lse, di, q_ids, k_ids)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp and the public wrapper.
# ----------------------------------------------------------------------------------------------

def _ids(q_id3, k_id3):
  """The kernels' lane / sublane-replicated id arrays from the compact (block, noisy, segment)
  ids `[B, T]` (built where used: the residuals keep the compact ids)."""
  return _kernel_ids(q_id3, NUM_LANES, -1), _kernel_ids(k_id3, NUM_SUBLANES, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, q_id3, k_id3, plan, plan_t, cfg: _Cfg):
  return _forward(q, k, v, *_ids(q_id3, k_id3), plan, cfg, with_lse=False)[0]


def _attend_fwd(q, k, v, q_id3, k_id3, plan, plan_t, cfg):
  o, lse = _forward(q, k, v, *_ids(q_id3, k_id3), plan, cfg)
  # Residuals stay compact: the log-sum-exp's first lane `[B, KV, G, Tq]`, the [B, T] ids.
  return o, (q, k, v, q_id3, k_id3, plan, plan_t, o, lse[..., 0])


def _attend_bwd(cfg, res, do):
  q, k, v, q_id3, k_id3, plan, plan_t, o, lse = res
  dq, dk, dv = _backward(q, k, v, o, lse, do, *_ids(q_id3, k_id3), plan, plan_t, cfg)
  return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _check_tiles(bs: BlockSizes, batch: int, tq: int, tk: int, dtype, interpret,
                 extra_k_tiles: int = 0) -> None:
  """TPU constraints on the tiles (padded lengths tq, tk), and the SMEM size of a step table
  (`extra_k_tiles`: the cache's k tiles, stepped before the window's)."""
  if interpret is not False:
    return
  sub = 16 if jnp.dtype(dtype).itemsize < 4 else NUM_SUBLANES
  if bs.block_q % sub and bs.block_q != tq:
    raise ValueError(f"block_q={bs.block_q} must be a multiple of {sub} on TPU")
  if bs.block_k % NUM_LANES and bs.block_k != tk:
    raise ValueError(f"block_k={bs.block_k} must be a multiple of {NUM_LANES} on TPU")
  plan_bytes = 4 * batch * (tq // bs.block_q) * (tk // bs.block_k + extra_k_tiles)
  if plan_bytes > SMEM_PLAN_BUDGET:
    warnings.warn(f"the attention step table takes {plan_bytes} bytes of SMEM (1 MiB on TPU); "
                  "use larger tiles or split the batch", stacklevel=3)


def block_diffusion_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: masks.Layout,
                              k_layout: masks.Layout, *, cache_k: jax.Array | None = None,
                              cache_v: jax.Array | None = None,
                              cache_layout: masks.Layout | None = None, cache_index=None,
                              block_sizes: BlockSizes | None = None, interpret=None,
                              mesh=None) -> jax.Array:
  """Grouped-query block-diffusion attention with the mask `masks.visible(q_layout, k_layout)`.

  Args:
    q: `[B, Tq, H, d]`; k, v: `[B, Tk, KV, d]`, H a multiple of KV (head h uses KV head
      h // (H // KV)). q_layout: Layout `[B, Tq]`; k_layout: Layout `[B, Tk]`.
    cache_k, cache_v: optional KV cache, keys before k: `[L, B, KV, S, d]` with `cache_index`
      the layer (int32 scalar), or `[B, KV, S, d]`; read in place by the kernel (see the module
      doc). cache_layout: Layout `[B, S]` of the slots. Forward only (no gradients).
    block_sizes: tile sizes; default `BlockSizes.default` of each device's piece (cache tiles:
      `cache_tile`).
    interpret: None = automatic (interpret mode unless the backend is TPU), a bool, or a
      `pltpu.InterpretParams` (simulated TPU: DMA, semaphores, race detection).
    mesh: None = the context mesh (`jax.set_mesh`): with more than one device the kernel runs
      inside `jax.shard_map`, batch and heads split (`sharded_attention.shard_attention`).
  Returns: `[B, Tq, H, d]` in q.dtype; differentiable in q, k, v (Pallas backward kernels) when
  there is no cache.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
  local = functools.partial(_local_attention, block_sizes=block_sizes, interpret=interpret)
  cache = None
  if cache_k is not None:
    if cache_layout is None:
      raise ValueError("cache_k needs its cache_layout")
    if cache_k.ndim == 4:  # one layer: a leading axis of 1 (a reshape, no copy)
      cache_k, cache_v, cache_index = cache_k[None], cache_v[None], 0
    if cache_k.shape[2] != k.shape[2] or cache_k.shape[4] != k.shape[3]:
      raise ValueError(f"cache {cache_k.shape} does not match keys {k.shape}: expected "
                       "[L, B, KV, S, d]")
    index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
    cache = dict(cache_k=cache_k, cache_v=cache_v, cache_layout=cache_layout, cache_index=index)
  return shard_attention(local, q, k, v, q_layout, k_layout, mesh=mesh, cache=cache)


def _local_attention(q, k, v, q_layout: masks.Layout, k_layout: masks.Layout, *,
                     block_sizes: BlockSizes | None, interpret, cache_k=None, cache_v=None,
                     cache_layout=None, cache_index=None, cache_heads=None) -> jax.Array:
  """`block_diffusion_attention` on one device (no mesh): q `[B, Tq, H, d]`, k/v
  `[B, Tk, KV, d]`, layouts `[B, T]` -> `[B, Tq, H, d]`. With a cache (`[L, B, KVc, S, d]`,
  `cache_index` a scalar): `cache_heads` `[KV]` int32 maps the kernel's KV heads to the cache's
  (None: the same heads; `shard_attention` passes it when the cache's heads are not split)."""
  batch, tq, h, d = q.shape
  tk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  bs = block_sizes or BlockSizes.default(tq, tk, q.dtype, g)
  interpret = default_interpret() if interpret is None else interpret
  tq_pad, tk_pad = _round_up(tq, bs.block_q), _round_up(tk, bs.block_k)
  nq, nk = tq_pad // bs.block_q, tk_pad // bs.block_k
  cached = cache_k is not None
  if cached:
    slots = cache_k.shape[3]
    preferred = bs.block_k_cache or (bs.block_k if block_sizes is not None else None)
    bkc = cache_tile(slots, preferred, interpret)
    nkc = slots // bkc
  else:
    bkc = nkc = 0
  _check_tiles(bs, batch, tq_pad, tk_pad, q.dtype, interpret, extra_k_tiles=nkc)
  cfg = _Cfg(block_q=bs.block_q, block_k=bs.block_k, num_q_tiles=nq, num_k_tiles=nkc + nk,
             scale=float(d) ** -0.5, interpret=interpret, num_cache_tiles=nkc, block_kc=bkc)

  q_id3, k_id3 = _pad_ids(q_layout, tq_pad), _pad_ids(k_layout, tk_pad)
  kinds = classify_tiles(q_id3, k_id3, bs.block_q, bs.block_k)

  pad_t = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q5 = pad_t(q, tq_pad).reshape(batch, tq_pad, kvh, g, d).transpose(0, 2, 3, 1, 4)
  k4 = pad_t(k, tk_pad).transpose(0, 2, 1, 3)
  v4 = pad_t(v, tk_pad).transpose(0, 2, 1, 3)
  if cached:
    c_id3 = _pad_ids(cache_layout, slots)
    c_kinds = classify_tiles(q_id3, c_id3, bs.block_q, bkc)  # [B, nq, nkc]
    kinds = jnp.concatenate([c_kinds, kinds], axis=-1)  # cache tiles, then window tiles
    steps = jnp.arange(nkc, dtype=jnp.int32)
    last = jnp.max(jnp.where(c_kinds != SKIP, steps, 0), axis=-1).reshape(-1).astype(jnp.int32)
    heads = (jnp.arange(kvh, dtype=jnp.int32) if cache_heads is None
             else jnp.asarray(cache_heads, jnp.int32))
    layer = jnp.reshape(jnp.asarray(cache_index, jnp.int32), (1,))
    ck = cache_k if cache_k.dtype == k.dtype else cache_k.astype(k.dtype)
    cv = cache_v if cache_v.dtype == v.dtype else cache_v.astype(v.dtype)
    q_ids, k_ids = _ids(q_id3, k_id3)
    o5 = _forward_cached(q5, ck, cv, k4, v4, q_ids, _kernel_ids(c_id3, NUM_SUBLANES, 1), k_ids,
                         make_plan(kinds), last, layer, heads, cfg)
  else:
    plan, plan_t = make_plan(kinds), make_plan(jnp.swapaxes(kinds, 1, 2))
    o5 = _attend(q5, k4, v4, q_id3, k_id3, plan, plan_t, cfg)
  return o5.transpose(0, 3, 1, 2, 4).reshape(batch, tq_pad, h, d)[:, :tq]


_warned_interpret = False


def _warn_interpret_once() -> None:
  """One `warnings.warn` per process: "pallas" away from TPU runs the interpreter."""
  global _warned_interpret
  if not _warned_interpret:
    _warned_interpret = True
    warnings.warn(f'attention_impl="pallas" on the {jax.default_backend()} backend runs the '
                  "Pallas kernel in interpret mode (slow, for testing); use \"auto\" or "
                  '"xla" for speed', stacklevel=3)


def pallas_attention(q, k, v, q_layout: masks.Layout, k_layout: masks.Layout,
                     **cache) -> jax.Array:
  """The `attention_impl="pallas"` entry point (default tiles; interpret mode, with a one-time
  warning, unless the backend is TPU; sharded over the context mesh). `cache`: the attention
  protocol's cache keywords (`cache_k`, `cache_v`, `cache_layout`, `cache_index`)."""
  if default_interpret():
    _warn_interpret_once()
  return block_diffusion_attention(q, k, v, q_layout, k_layout, **cache)


def pallas_tpu_attention(q, k, v, q_layout: masks.Layout, k_layout: masks.Layout,
                         **cache) -> jax.Array:
  """`attention_impl="pallas_tpu"`: always the Mosaic TPU kernel, never interpret mode; for
  exporting TPU programs (`jax.export(..., platforms=("tpu",))`) from a host without a TPU."""
  return block_diffusion_attention(q, k, v, q_layout, k_layout, interpret=False, **cache)
