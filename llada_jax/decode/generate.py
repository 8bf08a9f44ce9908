"""Jit-compiled block-diffusion decoding: one `lax.while_loop` over a per-row carry.

Each iteration of the loop, for every row that is not done:
  1. decides whether the row's active block is finished (SPEC 4.2 / 4.3 rules); if so, commits
     the block that leaves the editing window to the KV cache (a separate, uncounted forward
     computed from its final tokens), advances to the next block, and marks the row done at the
     last block or on EOS;
  2. runs one counted forward of the window (active block, or the last `mbe_window` blocks)
     against the cache, samples, and applies the joint M2T + T2T update.
Full prompt blocks are prefilled into the cache block-causally before the loop.

The canvas is stored with `(mbe_window - 1) * block_length` padding slots on the left so that the
window always has the same static length; canvas position p lives at index p + pad.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import masks
from llada_jax.config import ModelConfig
from llada_jax.decode.settings import DecodeSettings
from llada_jax.decode.update import get_sampler, get_update, sample
from llada_jax.model import kv_cache
from llada_jax.model.transformer import ForwardOutput, forward_core


@dataclasses.dataclass(frozen=True)
class StaticSpec:
  """Everything that fixes the compiled program's structure (one compilation per value)."""

  canvas_length: int  # T, a multiple of block_length
  prompt_bucket: int  # prompts are padded to this many slots (a multiple of block_length)
  gen_length: int
  block_length: int
  algorithm: str
  mbe_window: int
  greedy: bool
  trajectory: int  # 0 = off, else the number of forwards recorded per row
  attention_impl: str = "xla"
  moe_impl: str = "ragged"
  update_impl: str = "jnp"
  # "logits": the forward returns [B, W, V] logits for `sample`; "fused" / "pallas" /
  # "pallas_tpu": it returns the final hidden states and the sampler applies lm_head over
  # vocabulary tiles (`decode.update.get_sampler`).
  sampler_impl: str = "logits"
  use_cache: bool = True  # False: recompute the whole canvas every step (the reference way)
  batch_invariant: bool = False  # True: rows run one at a time (bitwise batch-independent)
  stream: bool = False  # True: host callback `on_block` whenever rows finish a block


@flax.struct.dataclass
class Knobs:
  """Traced settings: changing them does not recompile."""

  threshold: jax.Array
  editing_threshold: jax.Array
  max_post_steps: jax.Array
  num_to_transfer: jax.Array
  steps: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  eos_id: jax.Array  # a scalar, or `[B, 1]` per row (compared with `[B, T]` token arrays)
  mask_id: jax.Array
  eos_early_stop: jax.Array
  max_iterations: jax.Array  # 0: the default budget

  @classmethod
  def from_settings(cls, s: DecodeSettings) -> "Knobs":
    f32, i32 = jnp.float32, jnp.int32
    steps = min(s.steps, s.gen_length)  # steps = min(steps, gen_length // minimal_topk)
    return cls(threshold=jnp.asarray(s.threshold, f32),
               editing_threshold=jnp.asarray(s.editing_threshold, f32),
               max_post_steps=jnp.asarray(s.max_post_steps, i32),
               num_to_transfer=jnp.asarray(s.num_to_transfer, i32),
               steps=jnp.asarray(steps, i32), temperature=jnp.asarray(s.temperature, f32),
               top_k=jnp.asarray(s.top_k, i32), top_p=jnp.asarray(s.top_p, f32),
               eos_id=jnp.asarray(s.eos_id, i32), mask_id=jnp.asarray(s.mask_id, i32),
               eos_early_stop=jnp.asarray(s.eos_early_stop, bool),
               max_iterations=jnp.asarray(s.max_iterations, i32))


@flax.struct.dataclass
class Carry:
  """Loop state. B rows, T canvas length, pad = (mbe_window - 1) * block_length."""

  params: Any
  canvas: jax.Array  # [B, pad + T] int32
  prompt_len: jax.Array  # [B]
  first_block: jax.Array  # [B] block holding the first generated position
  num_blocks: jax.Array  # [B] blocks up to the end of the row's generation
  block: jax.Array  # [B] active (newest) block
  counter: jax.Array  # [B] 2.1: post-unmasking steps; 2.0: denoising step in the block
  converged: jax.Array  # [B] bool, 2.1: the last forward changed nothing in a mask-free window
  done: jax.Array  # [B] bool
  cache: dict
  keys: jax.Array  # [B, 2] per-row PRNG keys
  nfe: jax.Array  # [B] counted forwards
  fills: jax.Array  # [B] M2T fills
  edits: jax.Array  # [B] T2T edits
  commits: jax.Array  # [] cache-commit forwards (uncounted)
  iteration: jax.Array  # []
  traj_start: jax.Array  # [R, B] canvas position of the window start of each recorded forward
  traj_tokens: jax.Array  # [R, B, W] window tokens after the update
  traj_fill: jax.Array  # [R, B, W] bool
  traj_edit: jax.Array  # [R, B, W] bool


# Host handlers for streaming: called as handler(rows [B] bool, block [B], canvas [B, T],
# prompt_len [B]) with numpy arrays each time some rows finish a block.
STREAM_HANDLERS: list = []


def _stream_dispatch(rows, block, canvas, prompt_len):
  for handler in list(STREAM_HANDLERS):
    handler(np.asarray(rows), np.asarray(block), np.asarray(canvas), np.asarray(prompt_len))


def _row_mapped(fwd, enabled: bool):
  """With `enabled`, runs `forward_core` one row at a time under `lax.map`, so each row's
  arithmetic (XLA's fusion and tiling choices depend on shapes) never depends on the batch."""
  if not enabled:
    return fwd

  def run(params, c, tokens, positions, layout, *, cache=None, cache_layout=None,
          with_logits=True, with_hidden=False):
    take = lambda x, axis=0: jax.lax.dynamic_slice_in_dim(x, i_ref[0], 1, axis=axis)
    i_ref = [None]

    def body(i):
      i_ref[0] = i
      out = fwd(params, c, take(tokens), take(positions), jax.tree_util.tree_map(take, layout),
                cache=None if cache is None else jax.tree_util.tree_map(
                    lambda x: take(x, 1), cache),
                cache_layout=None if cache_layout is None else jax.tree_util.tree_map(
                    take, cache_layout),
                with_logits=with_logits, with_hidden=with_hidden)
      return (out.logits[0] if with_logits else None,
              out.final_hidden[0] if with_hidden else None,
              jax.tree_util.tree_map(lambda x: x[:, 0], out.kv))

    logits, hidden, kv = jax.lax.map(body, jnp.arange(tokens.shape[0]))
    return ForwardOutput(logits=logits,
                         kv=jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, 1), kv),
                         final_hidden=hidden)
  return run


def _row_mapped_sampler(enabled: bool, impl: str = "logits", lm_head=None):
  """The step's sampler: x `[B, W, V]` logits (impl "logits") or `[B, W, D]` final hidden states
  (the fused impls, which apply `lm_head` themselves) -> tokens, confidence `[B, W]`."""
  if impl == "logits":
    fn = sample
  else:
    fused = get_sampler(impl)
    fn = lambda x, *a, **k: fused(x, lm_head, *a, **k)
  if not enabled:
    return fn

  def run(x, keys, temperature, top_k, top_p, *, greedy):
    def body(xs):
      xr, k = xs
      tok, conf = fn(xr[None], k[None], temperature, top_k, top_p, greedy=greedy)
      return tok[0], conf[0]
    return jax.lax.map(body, (x, keys))
  return run


# The row helpers clamp `start` into range themselves (what dynamic_slice does anyway): XLA's
# SPMD partitioner returns wrong rows for an out-of-range batched dynamic slice when the array is
# split along both axes (done rows read past the canvas end; seen under a mesh with jax 0.10.2).
def _clamp(start: jax.Array, length: int, size: int) -> jax.Array:
  return jnp.clip(start, 0, length - size)


def _slice_rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """x `[B, N]` -> `[B, size]` taking x[b, start[b]:start[b]+size]."""
  start = _clamp(start, x.shape[1], size)
  return jax.vmap(lambda r, s: jax.lax.dynamic_slice(r, (s,), (size,)))(x, start)


def _slice_rows_3d(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """x `[B, N, V]` -> `[B, size, V]` taking x[b, start[b]:start[b]+size]."""
  start = _clamp(start, x.shape[1], size)
  return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, axis=0))(x, start)


def _write_rows(x: jax.Array, start: jax.Array, upd: jax.Array) -> jax.Array:
  start = _clamp(start, x.shape[1], upd.shape[1])
  return jax.vmap(lambda r, s, u: jax.lax.dynamic_update_slice(r, u, (s,)))(x, start, upd)


def _cache_layout(batch: int, length: int, valid_end: jax.Array, block_length: int):
  slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  seg = jnp.where(slots < valid_end[:, None], 0, -1).astype(jnp.int32)
  return masks.Layout(slots // block_length, jnp.zeros((batch, length), bool), seg)


def _constrain_cache(cache: dict) -> dict:
  """Under a multi-device context mesh, the cache's sharding from the default rules (`kv_cache`:
  rows over the batch axes, KV heads over `tensor`; what the Pallas attention's `shard_map`
  expects), so that GSPMD does not pick one for the zeros (e.g. split along the slots)."""
  mesh = jax.sharding.get_abstract_mesh()
  auto = jax.sharding.AxisType.Auto
  if mesh.empty or mesh.size == 1 or any(t != auto for t in mesh.axis_types):
    return cache  # (Explicit / Manual axes: the cache follows its inputs' shardings)
  from llada_jax import parallel  # noqa: PLC0415 (parallel imports the model)
  return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(
      x, parallel.activation_spec("kv_cache", x.shape, mesh)), cache)


def _cond_or_zeros(pred: jax.Array, fn):
  """`fn(None)` when `pred`, else zeros of its result: a `lax.cond` whose results are only what
  `fn` computes (its operands, e.g. the KV cache or the canvas, are read, never returned)."""
  zeros = lambda _: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                           jax.eval_shape(fn, None))
  return jax.lax.cond(pred, fn, zeros, None)


def _eos_in(canvas_pos_tokens, lo, hi, eos_id):
  """Any EOS at canvas positions [lo, hi) per row. canvas_pos_tokens `[B, T]` (unpadded)."""
  pos = jnp.arange(canvas_pos_tokens.shape[1])[None]
  return jnp.any((canvas_pos_tokens == eos_id) & (pos >= lo[:, None]) & (pos < hi[:, None]), -1)


def _window_forward_fn(c: ModelConfig, spec: StaticSpec):
  """`forward_core` with the spec's implementations (row-mapped when batch-invariant), the
  routed experts' weights read in place from their stacks (nothing here is differentiated)."""
  return _row_mapped(functools.partial(forward_core, attention_impl=spec.attention_impl,
                                       moe_impl=spec.moe_impl, experts_in_place=True),
                     spec.batch_invariant)


def prefill_kv(params, c: ModelConfig, spec: StaticSpec, tokens: jax.Array,
               first_block: jax.Array):
  """K/V of every full prompt block before `first_block` `[B]`, block-causally: tokens `[B, P]`
  (P a multiple of the block length) -> a forward's `kv` (`[L, B, P, KV, d]` per leaf). Slots
  from `first_block` on are computed too and overwritten before they become valid."""
  bl = spec.block_length
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  seg = jnp.where(pos < (first_block * bl)[:, None], 0, -1)

  def run(_):
    out = _window_forward_fn(c, spec)(params, c, tokens, pos,
                                      masks.block_causal(pos, bl, seg), with_logits=False)
    return out.kv

  # The conditional forward returns only K/V and leaves the cache out of its results: a cache
  # that went through a `lax.cond` would be copied (XLA gives each branch result its own
  # buffer); the callers' writes run unconditionally, in place.
  return _cond_or_zeros(jnp.any(first_block > 0), run)


def init_carry(params, c: ModelConfig, canvas0: jax.Array, prompt_len: jax.Array,
               row_keys: jax.Array, knobs: Knobs, spec: StaticSpec,
               gen_length: jax.Array | None = None) -> Carry:
  """The loop's first state: full prompt blocks prefilled into the cache, every row active.
  canvas0 `[B, T]` (prompt then masks), prompt_len `[B]`, row_keys `[B, 2]`; `gen_length` `[B]`
  (default: the spec's) bounds each row's generation."""
  bl, w = spec.block_length, spec.mbe_window
  win, pad = w * bl, (w - 1) * bl
  batch, t = canvas0.shape
  if gen_length is None:
    gen_length = jnp.full((batch,), spec.gen_length, jnp.int32)
  first_block = prompt_len // bl
  num_blocks = (prompt_len + gen_length + bl - 1) // bl
  if spec.use_cache:
    cache = _constrain_cache(kv_cache.init_cache(c, batch, kv_cache.capacity(t)))
    kv = prefill_kv(params, c, spec, canvas0[:, :spec.prompt_bucket], first_block)
    cache = kv_cache.write(cache, kv, jnp.zeros((batch,), jnp.int32))
  else:
    cache = {}
  r = max(spec.trajectory, 1)
  canvas = jnp.concatenate([jnp.full((batch, pad), knobs.mask_id, jnp.int32), canvas0], axis=1)
  return Carry(
      params=params, canvas=canvas, prompt_len=prompt_len, first_block=first_block,
      num_blocks=num_blocks, block=first_block, counter=jnp.zeros((batch,), jnp.int32),
      converged=jnp.zeros((batch,), bool), done=jnp.zeros((batch,), bool), cache=cache,
      keys=row_keys, nfe=jnp.zeros((batch,), jnp.int32), fills=jnp.zeros((batch,), jnp.int32),
      edits=jnp.zeros((batch,), jnp.int32), commits=jnp.zeros((), jnp.int32),
      iteration=jnp.zeros((), jnp.int32),
      traj_start=jnp.full((r, batch), -1, jnp.int32),
      traj_tokens=jnp.zeros((r, batch, win), jnp.int32),
      traj_fill=jnp.zeros((r, batch, win), bool), traj_edit=jnp.zeros((r, batch, win), bool))


def loop_body(c: ModelConfig, knobs: Knobs, spec: StaticSpec, batch: int, t: int):
  """One iteration of the decode loop for `batch` rows of canvas length `t`, as a function
  `Carry -> Carry` (see the module doc). The knobs may be scalars or, except the sampler's
  temperature / top_k / top_p and the mask id, per row: `[B]`, the EOS id `[B, 1]` (a server's
  rows in different modes)."""
  bl, w = spec.block_length, spec.mbe_window
  win = w * bl
  pad = (w - 1) * bl
  v21 = spec.algorithm == "llada2.1"
  fwd = _window_forward_fn(c, spec)
  fused = spec.sampler_impl != "logits"  # the window forward returns hidden states, not logits
  get_sampler(spec.sampler_impl)  # unknown names fail here, before tracing the loop
  cache_slots = kv_cache.capacity(t)
  r = max(spec.trajectory, 1)

  def window_of(cr: Carry):
    """Window tokens `[B, W]`, their canvas positions, and which of them are live."""
    start = (cr.block - (w - 1)) * bl  # canvas position of the window's first slot
    tokens = _slice_rows(cr.canvas, start + pad, win)
    pos = start[:, None] + jnp.arange(win, dtype=jnp.int32)[None]
    live = pos >= (cr.first_block * bl)[:, None]  # earlier slots are in the cache already
    return tokens, pos, live, start

  def _recompute_window_logits(cr: Carry, tokens, start, live):
    """No-cache baseline: the whole canvas, block-causal, with the live window as one block.
    Returns the window's logits, or its final hidden states when the sampler is fused."""
    flat = cr.canvas[:, pad:]
    p = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    in_window = (p >= jnp.maximum(start, cr.first_block * bl)[:, None]) & (
        p < ((cr.block + 1) * bl)[:, None])
    blk = jnp.where(in_window, cr.block[:, None], p // bl)
    lay = masks.Layout(blk, jnp.zeros((batch, t), bool), jnp.zeros((batch, t), jnp.int32))
    out = fwd(cr.params, c, flat, p, lay, with_logits=not fused, with_hidden=fused)
    logits = out.final_hidden if fused else out.logits
    return _slice_rows_3d(jnp.concatenate(
        [jnp.zeros((batch, pad) + logits.shape[2:], logits.dtype), logits], axis=1),
        start + pad, win)

  def body(cr: Carry) -> Carry:
    # ---- 1. finish / commit / advance -------------------------------------------------------
    tokens, pos, live, _ = window_of(cr)
    any_mask = jnp.any((tokens == knobs.mask_id) & live, axis=-1)
    if v21:
      counter = cr.counter + (~any_mask).astype(jnp.int32)
      finish = cr.converged | (counter > knobs.max_post_steps)
    else:
      counter = cr.counter
      finish = (~any_mask) | (counter >= knobs.steps)
    finish = finish & ~cr.done
    gen_end = (cr.block + 1) * bl
    flat = cr.canvas[:, pad:]
    eos_seen = _eos_in(flat, cr.prompt_len, gen_end, knobs.eos_id)
    eos_stop = eos_seen if not v21 else (eos_seen & knobs.eos_early_stop)
    new_block = cr.block + finish.astype(jnp.int32)
    done = cr.done | (finish & ((new_block >= cr.num_blocks) | eos_stop))
    leaving = new_block - w  # block that leaves the window on this advance
    commit_rows = finish & ~done & (leaving >= cr.first_block)

    commit_start = jnp.maximum(leaving, 0) * bl

    def commit(_):
      toks = _slice_rows(flat, commit_start, bl)
      cpos = commit_start[:, None] + jnp.arange(bl, dtype=jnp.int32)[None]
      lay = masks.block_causal(cpos, bl)
      out = fwd(cr.params, c, toks, cpos, lay, cache=cr.cache,
                cache_layout=_cache_layout(batch, cache_slots, commit_start, bl),
                with_logits=False)
      return out.kv

    if spec.use_cache:
      # K/V of the leaving blocks (zeros when no row commits), then an in-place write where
      # rows that do not commit write back their old block.
      kv = _cond_or_zeros(jnp.any(commit_rows), commit)
      cache = kv_cache.write(cr.cache, kv, commit_start, commit_rows)
    else:
      cache = cr.cache
    if spec.stream:
      jax.lax.cond(jnp.any(finish), lambda: jax.debug.callback(
          _stream_dispatch, finish, cr.block, flat, cr.prompt_len, ordered=True), lambda: None)
    cr = cr.replace(
        block=new_block, done=done, cache=cache,
        counter=jnp.where(finish, 0, counter), converged=cr.converged & ~finish,
        commits=cr.commits + jnp.any(commit_rows).astype(jnp.int32))

    # ---- 2. one counted forward of the window and the joint update ---------------------------
    def step(cr: Carry) -> Carry:
      active = ~cr.done
      tokens, pos, live, start = window_of(cr)
      def window_forward(canvas):
        """(logits, or final hidden states when the sampler is fused; the window's tokens)."""
        tokens = window_of(cr.replace(canvas=canvas))[0]
        if not spec.use_cache:
          return _recompute_window_logits(cr, tokens, start, live), tokens
        cache_end = jnp.maximum(cr.block - (w - 1), cr.first_block) * bl
        seg = jnp.where(live, 0, -1).astype(jnp.int32)
        lay = masks.Layout(jnp.broadcast_to(cr.block[:, None], pos.shape),
                           jnp.zeros(pos.shape, bool), seg)
        out = fwd(cr.params, c, tokens, jnp.maximum(pos, 0), lay, cache=cr.cache,
                  cache_layout=_cache_layout(batch, cache_slots, cache_end, bl),
                  with_logits=not fused,
                  with_hidden=fused)
        return (out.final_hidden if fused else out.logits), tokens  # [B, W, D] when fused

      def skipped(canvas):
        zeros = jax.eval_shape(window_forward, canvas)[0]
        return (jnp.zeros(zeros.shape, zeros.dtype), window_of(cr.replace(canvas=canvas))[0])

      # Only the forward is conditional (skipped once every row is done): the step runs
      # unconditionally so that the canvas is written in place below (a carry that went
      # through a `lax.cond` is copied). The window's tokens come out of the conditional (read
      # in both branches), so every later use reads that [B, W] buffer: XLA would otherwise
      # fuse re-reads of the old canvas into consumers not ordered before the write (the
      # fill / edit counts) and copy the canvas to keep it alive.
      logits, tokens = jax.lax.cond(jnp.any(active), window_forward, skipped, cr.canvas)
      step_keys = jax.vmap(jax.random.fold_in)(cr.keys, cr.nfe)
      lm_head = cr.params["lm_head"].astype(jnp.dtype(c.dtype)) if fused else None
      sampler = _row_mapped_sampler(spec.batch_invariant, spec.sampler_impl, lm_head)
      tok, conf = sampler(logits, step_keys, knobs.temperature, knobs.top_k, knobs.top_p,
                          greedy=spec.greedy)
      masked = (tokens == knobs.mask_id) & live
      editable = live & ~masked & (pos >= cr.prompt_len[:, None])
      if v21:
        min_fill = jnp.broadcast_to(knobs.num_to_transfer, (batch,))
        edit_thr = knobs.editing_threshold
      else:
        s = cr.counter
        min_fill = bl // knobs.steps + (s < bl % knobs.steps).astype(jnp.int32)
        edit_thr = jnp.inf
      new, m2t, t2t = get_update(spec.update_impl)(
          tokens, tok, conf, masked, editable, knobs.threshold, edit_thr, min_fill)
      m2t, t2t = m2t & active[:, None], t2t & active[:, None]
      new = jnp.where(active[:, None], new, tokens)
      canvas = _write_rows(cr.canvas, start + pad, new)
      done = cr.done
      if v21:
        converged = active & ~jnp.any(masked, -1) & ~jnp.any(t2t, -1)
        counter = cr.counter
      else:
        converged = cr.converged
        counter = cr.counter + active.astype(jnp.int32)
        # LLaDA2.0 early stop inside a block: an accepted EOS with no mask before the first EOS.
        flat = canvas[:, pad:]
        p = jnp.arange(t)[None]
        after_prompt = p >= cr.prompt_len[:, None]
        is_eos = (flat == knobs.eos_id) & after_prompt
        first_eos = jnp.min(jnp.where(is_eos, p, t), axis=-1)
        mask_before = jnp.any((flat == knobs.mask_id) & after_prompt & (p < first_eos[:, None]),
                              -1)
        accepted_eos = jnp.any(m2t & (tok == knobs.eos_id), -1)
        done = done | (active & knobs.eos_early_stop & accepted_eos & ~mask_before
                       & (first_eos < t))
      ts, tt, tf, te = cr.traj_start, cr.traj_tokens, cr.traj_fill, cr.traj_edit
      if spec.trajectory:
        slot = jnp.where(active & (cr.nfe < r), cr.nfe, r)  # r = out of range: dropped
        rows = jnp.arange(batch)
        ts = ts.at[slot, rows].set(start, mode="drop")
        tt = tt.at[slot, rows].set(new, mode="drop")
        tf = tf.at[slot, rows].set(m2t, mode="drop")
        te = te.at[slot, rows].set(t2t, mode="drop")
      return cr.replace(
          canvas=canvas, done=done, converged=converged, counter=counter,
          nfe=cr.nfe + active.astype(jnp.int32),
          fills=cr.fills + jnp.sum(m2t, -1).astype(jnp.int32),
          edits=cr.edits + jnp.sum(t2t, -1).astype(jnp.int32),
          traj_start=ts, traj_tokens=tt, traj_fill=tf, traj_edit=te)

    cr = step(cr)  # rows that are done change nothing; the window forward is skipped
    return cr.replace(iteration=cr.iteration + 1)

  return body


def _decode(params, c: ModelConfig, canvas0: jax.Array, prompt_len: jax.Array,
            row_keys: jax.Array, knobs: Knobs, spec: StaticSpec):
  batch, t = canvas0.shape
  pad = (spec.mbe_window - 1) * spec.block_length
  carry = init_carry(params, c, canvas0, prompt_len, row_keys, knobs, spec)
  body = loop_body(c, knobs, spec, batch, t)
  max_blocks = t // spec.block_length
  default_budget = max_blocks * (spec.mbe_window * spec.block_length + knobs.max_post_steps
                                 + 2) + 2
  max_iterations = jnp.where(knobs.max_iterations > 0, knobs.max_iterations, default_budget)

  def cond(cr: Carry):
    return jnp.any(~cr.done) & (cr.iteration < max_iterations)

  cr = jax.lax.while_loop(cond, body, carry)
  flat = cr.canvas[:, pad:]
  out = _slice_rows(jnp.concatenate(
      [flat, jnp.full((batch, spec.gen_length), knobs.mask_id, jnp.int32)], axis=1),
      prompt_len, spec.gen_length)
  return dict(tokens=out, nfe=cr.nfe, fills=cr.fills, edits=cr.edits, commits=cr.commits,
              iterations=cr.iteration, done=cr.done, traj_start=cr.traj_start,
              traj_tokens=cr.traj_tokens, traj_fill=cr.traj_fill, traj_edit=cr.traj_edit)


decode_jit = jax.jit(_decode, static_argnames=("c", "spec"))
