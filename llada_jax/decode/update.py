"""One denoising step's rule (the jnp reference of the fused update kernel) and the samplers.

Shapes: B rows, W window positions, V vocabulary, D hidden size.

Two ways to sample (`sampler_impl`, a static decode setting):
  "logits"   the window forward returns `[B, W, V]` float32 logits and `sample` (the reference)
             takes argmax + softmax, or sorts for top-k / top-p and draws a categorical;
  "fused"    the forward returns the final-normed hidden states `[B, W, D]` and `sample_tiled`
             computes the same outputs from them and `lm_head` `[D, V]` over vocabulary tiles,
             never holding more than one `[B, W, tile]` block of logits (see its docstring for
             what is exact and what is equal in distribution);
  "pallas", "pallas_tpu"  (registered by `llada_jax.kernels`): the greedy path as one Pallas TPU
             kernel (`kernels.fused_sampler`), sampling as "fused".
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jax import lax


def sample(logits: jax.Array, key: jax.Array | None, temperature, top_k, top_p,
           *, greedy: bool) -> tuple[jax.Array, jax.Array]:
  """Token and confidence per position (SPEC 4.1).

  Args:
    logits: `[B, W, V]` float32. key: `[B, 2]` uint32 per-row keys (unused when greedy).
    temperature, top_k, top_p: traced scalars (top_k 0 / top_p 1.0 = off).
    greedy: static; True is temperature 0 (argmax, confidence = softmax prob of it).
  Returns: tokens `[B, W]` int32, confidence `[B, W]` float32.
  """
  if greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)
    return tok, jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]
  x = logits / jnp.where(temperature > 0, temperature, 1.0)
  srt = jnp.sort(x, axis=-1)[..., ::-1]
  v = x.shape[-1]
  kth = jnp.take_along_axis(srt, jnp.clip(top_k - 1, 0, v - 1)[None, None, None]
                            * jnp.ones(x.shape[:-1] + (1,), jnp.int32), axis=-1)
  x = jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)
  # top-p: drop tokens once the cumulative probability of strictly better tokens exceeds p.
  srt = jnp.sort(x, axis=-1)[..., ::-1]
  cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
  remove_sorted = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), cum[..., :-1] > top_p],
                                  axis=-1)
  cutoff = jnp.min(jnp.where(remove_sorted, jnp.inf, srt), axis=-1, keepdims=True)
  x = jnp.where((top_p < 1.0) & (x < cutoff), -jnp.inf, x)
  probs = jax.nn.softmax(x, axis=-1)
  tok = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(key, x).astype(jnp.int32)
  return tok, jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]


def topk_mask(score: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
  """`[B, W]` bool: the min(k, #candidates) candidates with the highest score (ties: lower
  index first, as `lax.top_k`). `k` `[B]` int32 (traced)."""
  s = jnp.where(candidates, score, -jnp.inf)
  si, sj = s[:, :, None], s[:, None, :]
  idx = jnp.arange(s.shape[1])
  better = (sj > si) | ((sj == si) & (idx[None, None, :] < idx[None, :, None]))
  rank = jnp.sum(better & candidates[:, None, :], axis=-1)
  return candidates & (rank < k[:, None])


def update_block(old: jax.Array, tok: jax.Array, conf: jax.Array, masked: jax.Array,
                 editable: jax.Array, threshold, editing_threshold, min_fill: jax.Array):
  """The joint Mask-to-Token + Token-to-Token rule of one step (SPEC 4.2, 4.3).

  Args:
    old: `[B, W]` window tokens before the step. tok, conf: `[B, W]` sampler output.
    masked: `[B, W]` positions holding the mask token. editable: `[B, W]` non-prompt, decoded
      positions that T2T may rewrite. threshold, editing_threshold: `[B]` or scalars.
    min_fill: `[B]` int32 fallback count: if fewer than this many masks pass the threshold, the
      best min(min_fill, #masked) masks are filled instead (LLaDA2.1 num_to_transfer, LLaDA2.0
      the per-step schedule).
  Returns: new tokens `[B, W]`, m2t `[B, W]` bool, t2t `[B, W]` bool.
  """
  threshold = jnp.asarray(threshold)[..., None] if jnp.ndim(threshold) else threshold
  editing_threshold = (jnp.asarray(editing_threshold)[..., None] if jnp.ndim(editing_threshold)
                       else editing_threshold)
  hi = masked & (conf > threshold)
  enough = jnp.sum(hi, axis=-1) >= min_fill
  m2t = jnp.where(enough[:, None], hi, topk_mask(conf, masked, min_fill))
  t2t = (~masked) & editable & (conf > editing_threshold) & (tok != old)
  new = jnp.where(m2t | t2t, tok, old)
  return new, m2t, t2t


# impl(old, tok, conf, masked, editable, threshold, editing_threshold, min_fill) -> same as
# `update_block`. Other implementations (the fused Pallas kernel) register themselves.
UPDATE_IMPLS = {"jnp": update_block}
_LAZY_UPDATE = {"pallas": "llada_jax.kernels", "pallas_tpu": "llada_jax.kernels"}


def register_update(name: str, fn) -> None:
  UPDATE_IMPLS[name] = fn


def update_names() -> list[str]:
  return sorted(set(UPDATE_IMPLS) | set(_LAZY_UPDATE))


def get_update(name: str):
  if name not in UPDATE_IMPLS and name in _LAZY_UPDATE:
    importlib.import_module(_LAZY_UPDATE[name])
  if name not in UPDATE_IMPLS:
    raise ValueError(f"unknown update_impl {name!r}; choose from {update_names()}")
  return UPDATE_IMPLS[name]


# ---------------------------------------------------------------------------------------------
# Samplers fused with the LM head: the sampler's outputs from the final hidden states `[B, W, D]`
# and `lm_head` `[D, V]`, over vocabulary tiles, without the `[B, W, V]` logits.
# ---------------------------------------------------------------------------------------------

DEFAULT_VOCAB_TILE = 8192
DEFAULT_MAX_CANDIDATES = 128


def head_logits(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
  """The LM head exactly as `forward_core` computes it: a dot in the model dtype, then float32."""
  return jnp.dot(hidden, lm_head).astype(jnp.float32)


def sample_from_hidden(hidden, lm_head, key, temperature, top_k, top_p, *, greedy):
  """`sample` on the materialised logits `head_logits(hidden, lm_head)` (the reference path as a
  function of the hidden states; the exact fallback of `sample_tiled`)."""
  return sample(head_logits(hidden, lm_head), key, temperature, top_k, top_p, greedy=greedy)


def _vocab_tile(v: int, vocab_tile: int) -> tuple[int, int]:
  tv = max(1, min(vocab_tile, v))
  return tv, -(-v // tv)


def _tile_logits(hidden, lm_head, j, tv: int, temperature=None):
  """Logits `[B, W, tv]` float32 of vocabulary tile j and their token ids `[tv]`.

  Tile j covers ids [j*tv, (j+1)*tv); the last tile is shifted left to end at V (no padded copy
  of `lm_head`) and the ids it shares with the previous tile are -inf, so every id is seen once.
  With `temperature`, the logits are divided by it (as `sample` does)."""
  v = lm_head.shape[1]
  lo = j * tv
  start = jnp.minimum(lo, v - tv)
  cols = start + jnp.arange(tv, dtype=jnp.int32)
  logits = head_logits(hidden, lax.dynamic_slice_in_dim(lm_head, start, tv, axis=1))
  if temperature is not None:
    logits = logits / temperature
  return jnp.where(cols >= lo, logits, -jnp.inf), cols


def _online(m, s, tile):
  """Running max and sum of exp(x - max) after one more tile `[..., tv]`."""
  m_new = jnp.maximum(m, jnp.max(tile, axis=-1))
  s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(tile - m_new[..., None]), axis=-1)
  return m_new, s


def greedy_tiled(hidden: jax.Array, lm_head: jax.Array, *, vocab_tile: int = DEFAULT_VOCAB_TILE):
  """Greedy token and confidence from the hidden states, over vocabulary tiles.

  One pass carrying the running max, its first argmax and the running sum of exp(logit - max)
  (rescaled when the max grows). Token: identical to `jnp.argmax` of the full logits (same
  float32 logits, ties to the lower id; exact as long as the tile's dot gives the same values as
  the full one, which it does on CPU). Confidence: 1 / sum, the softmax probability of the
  argmax, equal to `sample`'s within float32 rounding of the sum (order and rescaling).
  Returns: tokens `[B, W]` int32, confidence `[B, W]` float32.
  """
  tv, n = _vocab_tile(lm_head.shape[1], vocab_tile)
  shape = hidden.shape[:-1]

  def body(j, carry):
    m, s, idx = carry
    tile, cols = _tile_logits(hidden, lm_head, j, tv)
    t_max = jnp.max(tile, axis=-1)
    t_arg = cols[jnp.argmax(tile, axis=-1)]
    idx = jnp.where(t_max > m, t_arg, idx)  # strict: an earlier tile keeps a tie
    m, s = _online(m, s, tile)
    return m, s, idx

  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.int32))
  _, s, idx = lax.fori_loop(0, n, body, init)
  return idx, 1.0 / s


def _gumbel_tiled(hidden, lm_head, keys, temperature, tv: int, n: int):
  """Plain temperature sampling: Gumbel-max over tiles. Tile j's noise comes from
  `fold_in(key_row, j)`; every id gets one independent Gumbel draw, so the argmax of
  logit / T + noise is an exact draw from softmax(logits / T) (not the same draw as
  `jax.random.categorical` on the full logits)."""
  shape = hidden.shape[:-1]

  def body(j, carry):
    m, s, best, idx, val = carry
    y, cols = _tile_logits(hidden, lm_head, j, tv, temperature)
    g = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, j), y.shape[1:]))(keys)
    z = y + g
    a = jnp.argmax(z, axis=-1)
    z_max = jnp.take_along_axis(z, a[..., None], axis=-1)[..., 0]
    upd = z_max > best
    best = jnp.where(upd, z_max, best)
    idx = jnp.where(upd, cols[a], idx)
    val = jnp.where(upd, jnp.take_along_axis(y, a[..., None], axis=-1)[..., 0], val)
    m, s = _online(m, s, y)
    return m, s, best, idx, val

  ninf = jnp.full(shape, -jnp.inf, jnp.float32)
  init = (ninf, jnp.zeros(shape, jnp.float32), ninf, jnp.zeros(shape, jnp.int32), ninf)
  m, s, _, idx, val = lax.fori_loop(0, n, body, init)
  return idx, jnp.exp(val - m) / s


def _candidates_tiled(hidden, lm_head, temperature, tv: int, n: int, k: int):
  """Pass over tiles keeping the k largest logit / T per position (sorted, ties to the lower
  id) with their ids, and the running max and sum of exp over the whole vocabulary."""
  shape = hidden.shape[:-1]

  def body(j, carry):
    m, s, cv, ci = carry
    y, cols = _tile_logits(hidden, lm_head, j, tv, temperature)
    tv_top, t_idx = lax.top_k(y, min(k, tv))
    nv, pos = lax.top_k(jnp.concatenate([cv, tv_top], -1), k)  # stable: earlier ids first
    ci = jnp.take_along_axis(jnp.concatenate([ci, cols[t_idx]], -1), pos, axis=-1)
    m, s = _online(m, s, y)
    return m, s, nv, ci

  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.full(shape + (k,), -jnp.inf, jnp.float32), jnp.zeros(shape + (k,), jnp.int32))
  return lax.fori_loop(0, n, body, init)


def _filter_candidates(b, m, s, v: int, top_k, top_p):
  """SPEC 4.1's top-k then top-p filter, decided on the sorted candidates `b` `[..., K]` (the K
  largest of V values; `m` their max, `s` the sum of exp(x - m) over all V).

  Returns (keep `[..., K]` bool: the filtered set restricted to the candidates, valid `[...]`:
  the filtered set lies entirely among the candidates, so `keep` is all of it). Mirrors
  `sample`'s formulas on the first K sorted entries: top-k keeps x >= the k-th largest (ties
  included); top-p removes sorted entry i once the cumulative filtered probability of entries
  before it exceeds p, then keeps x >= the smallest kept value."""
  kk = b.shape[-1]
  full = v <= kk  # the candidates are the whole vocabulary
  use_k, use_p = top_k > 0, top_p < 1.0
  kth = jnp.take_along_axis(b, jnp.broadcast_to(jnp.clip(top_k - 1, 0, kk - 1),
                                                b.shape[:-1] + (1,)), axis=-1)
  keep_k = (~use_k) | (b >= kth)
  last = b[..., -1]
  # Ties of the k-th value may continue past the candidates unless it beats the last one.
  valid_k = full | ((top_k <= kk) & (kth[..., 0] > last))
  e = jnp.where(keep_k, jnp.exp(b - m[..., None]), 0.0)
  z = jnp.where(use_k, jnp.sum(e, -1), s)  # normaliser of the top-k filtered distribution
  cum = jnp.cumsum(e / z[..., None], axis=-1)
  remove = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), cum[..., :-1] > top_p], -1)
  cut = jnp.min(jnp.where(remove, jnp.inf, jnp.where(keep_k, b, -jnp.inf)), -1)
  tail_removed = cum[..., -1] > top_p  # the first sorted entry after the candidates
  if not full:
    # With top-k every id after the candidates is -inf: kept (cutoff -inf) unless removed.
    cut = jnp.where(use_k & ~tail_removed, -jnp.inf, cut)
  valid_p = full | (tail_removed & (cut > last))
  keep = keep_k & (b >= jnp.where(use_p, cut, -jnp.inf)[..., None])
  valid = jnp.where(use_k, valid_k, jnp.where(use_p, valid_p, full))
  return keep, valid


def sample_tiled(hidden: jax.Array, lm_head: jax.Array, key: jax.Array | None, temperature,
                 top_k, top_p, *, greedy: bool, vocab_tile: int = DEFAULT_VOCAB_TILE,
                 max_candidates: int = DEFAULT_MAX_CANDIDATES) -> tuple[jax.Array, jax.Array]:
  """`sample`'s outputs from the final hidden states, over vocabulary tiles (sampler_impl="fused").

  Args:
    hidden: `[B, W, D]` final-normed hidden states (model dtype). lm_head: `[D, V]` (model dtype).
    key, temperature, top_k, top_p, greedy: as `sample`.
    vocab_tile: static tile width (the last tile is shifted to end at V).
    max_candidates: static K of the top-k / top-p candidate buffer.
  Returns: tokens `[B, W]` int32, confidence `[B, W]` float32.

  Greedy (`greedy_tiled`): token exact, confidence within float32 rounding.
  Sampling: which branch runs is decided at run time from the traced knobs.
    * no top-k, no top-p: Gumbel-max over tiles, one pass; an exact draw from the same
      distribution as `sample` (equal in distribution, not draw for draw); confidence = the
      drawn token's probability within float32 rounding.
    * top-k and/or top-p: one pass keeping the K = `max_candidates` largest logits per position;
      the filter is decided on them exactly as `sample` decides it (up to float32 rounding of the
      cumulative probability right at p), and the token is drawn among the kept candidates with
      `jax.random.categorical` (equal in distribution). When the filtered set may reach past the
      K candidates (top_k > K, ties of the k-th value or the top-p cutoff reaching the last
      candidate, or a nucleus of more than K tokens), that row instead runs `sample` on its own
      materialised logits `[W, V]` (`sample_from_hidden` with the row's key: the "logits" path's
      draws whenever the row's LM-head dot equals the batched one, as on CPU; confidence within
      float32 rounding, the row's softmax sum being reduced in another order).
  """
  v = lm_head.shape[1]
  tv, n = _vocab_tile(v, vocab_tile)
  if greedy:
    return greedy_tiled(hidden, lm_head, vocab_tile=vocab_tile)
  t = jnp.where(temperature > 0, temperature, 1.0)
  kk = min(max_candidates, v)

  def plain():
    return _gumbel_tiled(hidden, lm_head, key, t, tv, n)

  def filtered():
    m, s, b, ids = _candidates_tiled(hidden, lm_head, t, tv, n, kk)
    keep, valid = _filter_candidates(b, m, s, v, top_k, top_p)

    x = jnp.where(keep, b, -jnp.inf)
    pos = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(key, x)
    pos = pos.astype(jnp.int32)[..., None]
    e = jnp.where(keep, jnp.exp(b - m[..., None]), 0.0)
    tok = jnp.take_along_axis(ids, pos, -1)[..., 0]
    conf = jnp.take_along_axis(e, pos, -1)[..., 0] / jnp.sum(e, -1)

    def fallback():
      """Rows with a position the candidates cannot decide: `sample` on that row's logits, one
      row at a time (at most `[W, V]` logits live), the other rows keep their draws."""
      def row(xs):
        h, k, need, t_row, c_row = xs
        return lax.cond(need, lambda: tuple(a[0] for a in sample_from_hidden(
            h[None], lm_head, k[None], temperature, top_k, top_p, greedy=False)),
            lambda: (t_row, c_row))
      return lax.map(row, (hidden, key, ~jnp.all(valid, -1), tok, conf))

    return lax.cond(jnp.all(valid), lambda: (tok, conf), fallback)

  return lax.cond((top_k <= 0) & (top_p >= 1.0), plain, filtered)


# impl(hidden [B, W, D], lm_head [D, V], key, temperature, top_k, top_p, *, greedy) -> (tokens,
# confidence). "logits" is the unfused path: the decoder then asks the forward for logits and
# calls `sample` (its entry here, `sample_from_hidden`, computes the same from hidden states).
SAMPLER_IMPLS = {"logits": sample_from_hidden, "fused": sample_tiled}
_LAZY_SAMPLER = {"pallas": "llada_jax.kernels", "pallas_tpu": "llada_jax.kernels"}


def register_sampler(name: str, fn) -> None:
  SAMPLER_IMPLS[name] = fn


def sampler_names() -> list[str]:
  return sorted(set(SAMPLER_IMPLS) | set(_LAZY_SAMPLER))


def get_sampler(name: str):
  if name not in SAMPLER_IMPLS and name in _LAZY_SAMPLER:
    importlib.import_module(_LAZY_SAMPLER[name])
  if name not in SAMPLER_IMPLS:
    raise ValueError(f"unknown sampler_impl {name!r}; choose from {sampler_names()}")
  return SAMPLER_IMPLS[name]
