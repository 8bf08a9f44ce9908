"""The Pallas block-diffusion attention kernel (interpret mode on CPU) against dense references.

Tolerances (measured over 8 seeds x every shape below):
  float32: forward and gradients within 1e-5 absolute of `model.layers.attention` (observed max
    6e-7 for outputs of magnitude ~3.6, 1.9e-6 for gradients of magnitude ~7).
  bfloat16: the kernel, like the XLA bf16 path, rounds the probabilities (and dS) to bf16 for the
    MXU and the results to bf16 (8-bit mantissa: relative step 2^-8 = 3.9e-3). Against float32
    math on the same bf16 inputs, the error relative to max|reference| must stay below 2^-7 for
    outputs and 2^-6 for gradients (observed max 4.0e-3 / 6.0e-3; the XLA bf16 path: 6.2e-3 /
    5.3e-3), and never exceed twice the XLA bf16 path's error plus one bf16 step.
Rows that see no key are excluded (the dense path gives them a meaningless uniform row, the kernel
zeros); their cotangents are zero in the gradient checks.
"""

import functools
import importlib.util
import json
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import llada_jax
from llada_jax import masks
from llada_jax.kernels import block_attention as ba
from llada_jax.kernels.reference import attention_reference, exact_tile_kinds
from llada_jax.model import layers
from llada_jax.model import transformer
from llada_jax.model.transformer import register_attention

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HYP = dict(derandomize=True, deadline=None, print_blob=True,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Layout generators (numpy, from a seed): the decoder's, the 2L training one, plain block-causal
# and arbitrary ids.
# ---------------------------------------------------------------------------------------------

def _layout(block, noisy, seg) -> masks.Layout:
  return masks.Layout(jnp.asarray(block, jnp.int32), jnp.asarray(noisy, bool),
                      jnp.asarray(seg, jnp.int32))


def decode_layouts(rng, batch, window, cache):
  """Decoder step: window queries share the active block id; keys = cache slots (valid up to a
  per-row end, -1 after) followed by the window (unwritten window slots have segment -1)."""
  bl = int(rng.choice([2, 4, 8]))
  qb, qs, kb, ks = [], [], [], []
  for _ in range(batch):
    active = int(rng.integers(0, cache // bl + 1))
    end = int(rng.integers(0, min(active * bl, cache) + 1))
    live = np.arange(window) >= int(rng.integers(0, window // 2 + 1))
    slots = np.arange(cache)
    qb.append(np.full(window, active))
    qs.append(np.where(live, 0, -1))
    kb.append(np.concatenate([slots // bl, np.full(window, active)]))
    ks.append(np.concatenate([np.where(slots < end, 0, -1), np.where(live, 0, -1)]))
  zq, zk = np.zeros((batch, window), bool), np.zeros((batch, cache + window), bool)
  return _layout(qb, zq, qs), _layout(kb, zk, ks)


def training_layouts(rng, batch, two_l):
  """The 2L [x_t ; x_0] layout with packed documents and trailing padding (segment -1)."""
  length = two_l // 2
  bl = int(rng.choice([d for d in (1, 2, 3, 4, 5, 6, 8, 12, 16) if length % d == 0]))
  segs = []
  for _ in range(batch):
    cuts = np.sort(rng.integers(0, length + 1, size=int(rng.integers(0, 4))))
    seg = np.searchsorted(cuts, np.arange(length), side="right")
    pad = int(rng.integers(0, length // 3 + 1))
    segs.append(np.where(np.arange(length) >= length - pad, -1, seg))
  lay = masks.training(length, bl, jnp.asarray(np.array(segs), jnp.int32))
  return lay, lay


def causal_layouts(rng, batch, length):
  bl = int(rng.choice([1, 3, 4, 8, 16, length]))
  lay = masks.from_block_length(batch, length, bl)
  return lay, lay


def random_layouts(rng, batch, tq, tk):
  def one(t):
    return _layout(rng.integers(0, 4, (batch, t)), rng.random((batch, t)) < 0.5,
                   rng.integers(-1, 2, (batch, t)))
  return one(tq), one(tk)


# (name, batch, Tq, Tk, H, KV, d, block_q, block_k): few shapes (one compilation each), many
# random layouts and values per shape.
SHAPES = [
    ("decode", 2, 8, 40, 4, 2, 16, 8, 16),
    ("decode", 1, 16, 64, 8, 2, 8, 16, 32),
    ("training", 1, 48, 48, 4, 1, 8, 16, 16),
    ("training", 2, 40, 40, 2, 2, 8, 16, 8),
    ("causal", 1, 37, 37, 3, 1, 16, 8, 16),
    ("random", 2, 21, 29, 4, 4, 8, 8, 8),
    ("decode", 1, 16, 528, 2, 1, 128, 16, 256),  # TPU-sized lanes: d = 128, key tile 256
    ("decode", 1, 32, 96, 4, 1, 16, 32, 32),  # one q tile (MBE-sized window), GQA 4:1
    ("training", 1, 64, 64, 8, 8, 16, 32, 16),  # MHA, q tiles larger than k tiles
    ("causal", 2, 24, 24, 6, 2, 8, 24, 8),  # GQA 3:1, a single q tile, block_q = Tq
]


def make_layouts(rng, shape):
  family, batch, tq, tk = shape[:4]
  if family == "decode":
    return decode_layouts(rng, batch, tq, tk - tq)
  if family == "training":
    return training_layouts(rng, batch, tq)
  if family == "causal":
    return causal_layouts(rng, batch, tq)
  return random_layouts(rng, batch, tq, tk)


def make_inputs(rng, shape, dtype=jnp.float32):
  _, batch, tq, tk, h, kv, d = shape[:7]
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  return f(batch, tq, h, d), f(batch, tk, kv, d), f(batch, tk, kv, d), f(batch, tq, h, d)


@functools.partial(jax.jit, static_argnames=("impl", "bs"))
def value_and_grads(q, k, v, ct, q_layout, k_layout, *, impl, bs=None):
  """Output and d/d(q, k, v) of sum(out * ct), ct zeroed on rows that see no key."""
  if impl == "pallas":
    fn = functools.partial(ba.block_diffusion_attention, block_sizes=bs)
  elif impl == "xla":
    fn = lambda q, k, v, ql, kl: layers.attention(q, k, v, masks.visible(ql, kl))
  else:
    fn = attention_reference
  alive = jnp.any(masks.visible(q_layout, k_layout), axis=-1)[:, :, None, None]
  ct = jnp.where(alive, ct, 0)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_layout, k_layout).astype(jnp.float32) * ct)
  out = fn(q, k, v, q_layout, k_layout)
  return jnp.where(alive, out, 0), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)), initial=0))


# ---------------------------------------------------------------------------------------------
# Mask rule and tile classification.
# ---------------------------------------------------------------------------------------------

def test_visible_ids_equals_masks_visible():
  """The in-kernel rule is `masks.visible` on every combination of small ids."""
  vals = [(b, n, s) for b in range(3) for n in (0, 1) for s in (-1, 0, 1)]
  ids = np.array(vals, np.int32).T  # [3, N]
  lay = _layout(ids[0][None], ids[1][None] != 0, ids[2][None])
  ref = np.asarray(masks.visible(lay, lay))[0]
  got = np.asarray(ba.visible_ids(ids[0][:, None], ids[1][:, None], ids[2][:, None],
                                  ids[0][None], ids[1][None], ids[2][None]))
  np.testing.assert_array_equal(got, ref)


_tile_kinds_jit = jax.jit(ba.tile_kinds, static_argnums=(2, 3))


@settings(max_examples=40, **HYP)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES),
       tiles=st.sampled_from([(4, 4), (8, 8), (8, 16), (16, 8), (5, 7), (32, 32)]))
def test_tile_classification_is_conservative(seed, shape, tiles):
  """SKIP tiles hold no visible pair and FULL tiles only visible pairs (padding invisible)."""
  rng = np.random.default_rng(seed)
  ql, kl = make_layouts(rng, shape)
  got = np.asarray(_tile_kinds_jit(ql, kl, *tiles))
  exact = exact_tile_kinds(ql, kl, *tiles)
  assert not np.any((got == ba.SKIP) & (exact != ba.SKIP))
  assert not np.any((got == ba.FULL) & (exact != ba.FULL))


@pytest.mark.parametrize("bl,tiles", [(8, (8, 8)), (8, (16, 32)), (4, (16, 16))])
def test_tile_classification_exact_on_aligned_training_layout(bl, tiles):
  """With tiles aligned to blocks and one document, the summaries lose nothing."""
  length = 64
  lay = masks.training(length, bl, jnp.zeros((1, length), jnp.int32))
  got = np.asarray(ba.tile_kinds(lay, lay, *tiles))
  np.testing.assert_array_equal(got, exact_tile_kinds(lay, lay, *tiles))


def test_make_plan_orders_live_tiles_first_and_repeats_the_last():
  kinds = jnp.array([[[0, 2, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]], jnp.int32)
  plan = np.asarray(ba.make_plan(kinds)).reshape(1, 3, 5)
  np.testing.assert_array_equal(plan // 4, [[[1, 3, 3, 3, 3], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]])
  np.testing.assert_array_equal(plan % 4, [[[2, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]])


# ---------------------------------------------------------------------------------------------
# Forward and gradients.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@settings(max_examples=2, **HYP)
@given(seed=st.integers(0, 2**31 - 1))
def test_forward_and_gradients_fp32(shape, seed):
  rng = np.random.default_rng(seed)
  ql, kl = make_layouts(rng, shape)
  q, k, v, ct = make_inputs(rng, shape)
  bs = ba.BlockSizes(*shape[7:9])
  out, grads = value_and_grads(q, k, v, ct, ql, kl, impl="pallas", bs=bs)
  ref_out, ref_grads = value_and_grads(q, k, v, ct, ql, kl, impl="xla")
  assert max_err(out, ref_out) <= 1e-5
  for name, g, r in zip("qkv", grads, ref_grads):
    assert max_err(g, r) <= 1e-5, name


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=["decode", "training"])
def test_bf16_within_rounding_of_fp32(shape):
  """bf16 kernel vs float32 math on the same bf16 inputs (see the module docstring)."""
  rng = np.random.default_rng(7)
  ql, kl = make_layouts(rng, shape)
  q, k, v, ct = make_inputs(rng, shape, jnp.bfloat16)
  bs = ba.BlockSizes(*shape[7:9])
  out, grads = value_and_grads(q, k, v, ct, ql, kl, impl="pallas", bs=bs)
  xla_out, xla_grads = value_and_grads(q, k, v, ct, ql, kl, impl="xla")
  f32 = lambda x: x.astype(jnp.float32)
  truth_out, truth_grads = value_and_grads(f32(q), f32(k), f32(v), f32(ct), ql, kl, impl="xla")
  for i, (got, xla, truth) in enumerate(zip((out,) + grads, (xla_out,) + xla_grads,
                                            (truth_out,) + truth_grads)):
    scale = float(np.max(np.abs(np.asarray(truth))))
    err, xla_err = max_err(got, truth), max_err(xla, truth)
    assert err <= (2 ** -7 if i == 0 else 2 ** -6) * scale, (i, err, scale)
    assert err <= 2 * xla_err + 2 ** -8 * scale, (i, err, xla_err, scale)


def test_interpret_params_simulated_tpu_no_races():
  """Simulated TPU (DMAs, 2 cores for the parallel grid axes, NaN-filled scratch): same values,
  no data race."""
  from jax.experimental.pallas import tpu as pltpu
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  shape = ("training", 1, 16, 16, 2, 1, 8, 8, 8)
  rng = np.random.default_rng(3)
  ql, kl = make_layouts(rng, shape)
  q, k, v, ct = make_inputs(rng, shape)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  alive = jnp.any(masks.visible(ql, kl), axis=-1)[:, :, None, None]
  ct = jnp.where(alive, ct, 0)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, ql, kl) * ct)
  kern = functools.partial(ba.block_diffusion_attention, block_sizes=ba.BlockSizes(8, 8),
                           interpret=params)
  val, grads = jax.value_and_grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
  rval, rgrads = jax.value_and_grad(loss(attention_reference), argnums=(0, 1, 2))(q, k, v)
  assert ipc.races is not None and not ipc.races.races_found
  assert abs(float(val) - float(rval)) <= 1e-4
  for g, r in zip(grads, rgrads):
    assert max_err(g, r) <= 1e-5


# ---------------------------------------------------------------------------------------------
# The KV cache as separate operands (decoding: read in place, forward only).
# ---------------------------------------------------------------------------------------------

def split_cache(k_layout: masks.Layout, slots: int):
  """(cache layout `[B, S]`, window layout) of a decode key layout [cache ; window]."""
  head = lambda x: x[:, :slots]
  tail = lambda x: x[:, slots:]
  return (masks.Layout(*map(head, (k_layout.block, k_layout.noisy, k_layout.segment))),
          masks.Layout(*map(tail, (k_layout.block, k_layout.noisy, k_layout.segment))))


@functools.partial(jax.jit, static_argnames=("impl", "bs", "layers"))
def cached_attention(q, k, v, q_layout, k_layout, *, impl, bs=None, layers=3):
  """The attention against [cache ; window] from concatenated k, v `[B, S + W, KV, d]`: the
  first S keys become a stacked cache `[layers, B, KV, S, d]` (layer 1 real, the others
  garbage) read at cache_index 1."""
  slots = k.shape[1] - q.shape[1]
  cache_layout, win_layout = split_cache(k_layout, slots)
  to_cache = lambda x: jnp.swapaxes(x[:, :slots], 1, 2)
  stack = lambda x: jnp.stack([x + 100.0] + [x] + [x * 0 - 50.0] * (layers - 2))
  kw = dict(cache_k=stack(to_cache(k)), cache_v=stack(to_cache(v)), cache_layout=cache_layout,
            cache_index=jnp.int32(1))
  if impl == "pallas":
    return ba.block_diffusion_attention(q, k[:, slots:], v[:, slots:], q_layout, win_layout,
                                        block_sizes=bs, **kw)
  return transformer.xla_attention(q, k[:, slots:], v[:, slots:], q_layout, win_layout, **kw)


DECODE_SHAPES = [s for s in SHAPES if s[0] == "decode"]


@settings(max_examples=24, **HYP)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(DECODE_SHAPES),
       default_tiles=st.booleans())
def test_cache_operands_equal_attention_over_concatenated_keys(seed, shape, default_tiles):
  """Kernel (cache tiles then window tiles, layer picked by index) and XLA path (scores against
  cache and window apart, one softmax) equal dense attention over [cache ; window]."""
  rng = np.random.default_rng(seed)
  ql, kl = make_layouts(rng, shape)
  q, k, v, _ = make_inputs(rng, shape)
  alive = jnp.any(masks.visible(ql, kl), axis=-1)[:, :, None, None]
  ref = attention_reference(q, k, v, ql, kl)
  bs = None if default_tiles else ba.BlockSizes(*shape[7:9])
  out = cached_attention(q, k, v, ql, kl, impl="pallas", bs=bs)
  xla = jnp.where(alive, cached_attention(q, k, v, ql, kl, impl="xla"), 0)
  assert max_err(out, ref) <= 1e-5
  assert max_err(xla, ref) <= 1e-5


def test_dead_cache_tiles_are_not_read():
  """Cache slots past each row's valid end, in whole dead tiles, hold NaN: the kernel skips
  those tiles (no DMA, no arithmetic), so the output stays finite and exact."""
  b, w, slots, h, kv, d = 2, 8, 64, 4, 2, 16
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(b, w, h, d), f(b, w, kv, d), f(b, w, kv, d)
  ck, cv = f(b, kv, slots, d), f(b, kv, slots, d)
  ends = np.array([16, 40])  # tile-aligned (tiles of 8 slots): dead tiles are all-NaN
  slot = np.arange(slots)
  cache_layout = _layout(np.broadcast_to(slot // 8, (b, slots)), np.zeros((b, slots), bool),
                         np.where(slot[None] < ends[:, None], 0, -1))
  win = _layout(np.full((b, w), 9), np.zeros((b, w), bool), np.zeros((b, w), np.int32))
  dead = jnp.asarray(slot[None, None, :, None] >= ends[:, None, None, None])
  nan_k, nan_v = jnp.where(dead, jnp.nan, ck), jnp.where(dead, jnp.nan, cv)
  out = ba.block_diffusion_attention(q, k, v, win, win, cache_k=nan_k, cache_v=nan_v,
                                     cache_layout=cache_layout, block_sizes=ba.BlockSizes(8, 8))
  ref = attention_reference(q, jnp.concatenate([jnp.swapaxes(ck, 1, 2), k], 1),
                            jnp.concatenate([jnp.swapaxes(cv, 1, 2), v], 1), win,
                            cache_layout.concat(win))
  assert bool(jnp.all(jnp.isfinite(out)))
  assert max_err(out, ref) <= 1e-5


def test_cache_tile_choice():
  assert [ba.cache_tile(n) for n in (64, 384, 512, 640, 1024, 4096)] == [64, 128, 512, 128,
                                                                       512, 512]
  assert ba.cache_tile(96, 32) == 32  # a requested tile that divides the cache
  with pytest.raises(ValueError, match="kv_cache.capacity"):
    ba.cache_tile(600)
  assert ba.cache_tile(600, interpret=True) == 300


def test_model_forward_against_the_cache_equals_one_forward():
  """forward_core on a window against a cache (kv_cache layout, written by kv_cache.write)
  equals the block-causal forward of the whole sequence, XLA and Pallas (8-slot tiles)."""
  from llada_jax.model import kv_cache
  from llada_jax.model.transformer import forward_core
  config, params = llada_jax.load_hf_checkpoint(os.path.join(FIXTURES, "llada2_tiny"))
  rng = np.random.default_rng(0)
  bl, n_cache, b = 4, 12, 2
  tokens = jnp.asarray(rng.integers(0, 500, (b, n_cache + bl)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(n_cache + bl, dtype=jnp.int32), tokens.shape)
  full = forward_core(params, config, tokens, pos, masks.block_causal(pos, bl))
  slots = kv_cache.capacity(n_cache + bl)
  pre = forward_core(params, config, tokens[:, :n_cache], pos[:, :n_cache],
                     masks.block_causal(pos[:, :n_cache], bl), with_logits=False)
  cache = kv_cache.write(kv_cache.init_cache(config, b, slots), pre.kv, jnp.zeros(b, jnp.int32))
  slot = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
  cache_layout = masks.Layout(slot // bl, jnp.zeros((b, slots), bool),
                              jnp.where(slot < n_cache, 0, -1))
  for impl in ("xla", "pallas_tiles8"):
    if impl == "pallas_tiles8":
      register_attention(impl, functools.partial(ba.block_diffusion_attention,
                                                 block_sizes=ba.BlockSizes(8, 8)))
    try:
      win = forward_core(params, config, tokens[:, n_cache:], pos[:, n_cache:],
                         masks.block_causal(pos[:, n_cache:], bl), cache=cache,
                         cache_layout=cache_layout, attention_impl=impl)
    finally:
      transformer.ATTENTION_IMPLS.pop("pallas_tiles8", None)
    assert max_err(win.logits, full.logits[:, n_cache:]) <= 1e-4, impl


def test_cache_write_in_place_semantics():
  """kv_cache.write: each row's block at its own start (clamped), rows=False keep theirs."""
  from llada_jax.model import kv_cache
  rng = np.random.default_rng(0)
  old = jnp.asarray(rng.standard_normal((2, 3, 2, 16, 4)), jnp.float32)
  new = jnp.asarray(rng.standard_normal((2, 3, 4, 2, 4)), jnp.float32)
  start, rows = jnp.array([0, 5, 14]), jnp.array([True, False, True])
  got = np.asarray(kv_cache.write({"s": {"k": old}}, {"s": {"k": new}}, start, rows)["s"]["k"])
  want = np.array(old)
  for r, s0 in enumerate([0, 5, 12]):  # 14 clamps to 16 - 4
    if rows[r]:
      want[:, r, :, s0:s0 + 4] = np.swapaxes(np.asarray(new[:, r]), 1, 2)
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# The model with attention_impl="pallas".
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_tiles_impl():
  """A test-only attention_impl with 8 x 8 tiles (removed from the registry afterwards)."""
  register_attention("pallas_tiles8", functools.partial(ba.block_diffusion_attention,
                                                        block_sizes=ba.BlockSizes(8, 8)))
  yield "pallas_tiles8"
  transformer.ATTENTION_IMPLS.pop("pallas_tiles8", None)


@pytest.mark.parametrize("name", ["llada2_tiny", "llada2_tiny_groups"])
def test_forward_reproduces_fixture_logits(name, small_tiles_impl):
  d = os.path.join(FIXTURES, name)
  config, params = llada_jax.load_hf_checkpoint(d)
  gold = np.load(os.path.join(d, "golden.npz"))
  ids = gold["fwd_input_ids"].reshape(1, -1)
  cases = [("fwd_block4_logits", 4, "pallas"), ("fwd_block8_logits", 8, "pallas"),
           ("fwd_full_logits", None, "pallas")]
  if name == "llada2_tiny":  # several tiles per axis: skipped, partial and full tiles
    cases.append(("fwd_block4_logits", 4, small_tiles_impl))
  for key, bl, impl in cases:
    logits = llada_jax.forward(params, config, ids, block_length=bl, attention_impl=impl)
    assert max_err(logits[0], gold[key].reshape(logits.shape[1:])) <= 1e-4, (key, impl)


def test_training_loss_gradients_through_the_model():
  """The 2L layout with two documents and padding: loss and parameter gradients of the masked
  diffusion loss equal the XLA path's (padding rows differ but feed nothing)."""
  from llada_jax.model.transformer import forward_core
  config, params = llada_jax.load_hf_checkpoint(os.path.join(FIXTURES, "llada2_tiny"))
  length, rng = 16, np.random.default_rng(0)
  x0 = jnp.asarray(rng.integers(0, 500, (2, length)), jnp.int32)
  xt = jnp.where(rng.random((2, length)) < 0.5, config.mask_token_id, x0)
  seg = jnp.asarray([[0] * 10 + [1] * 6, [0] * 12 + [-1] * 4], jnp.int32)
  layout = masks.training(length, 4, seg)
  tokens, pos = jnp.concatenate([xt, x0], 1), jnp.tile(jnp.arange(length), (2, 2))
  weight = (xt == config.mask_token_id) & (seg >= 0)

  @functools.partial(jax.jit, static_argnums=1)
  def loss_and_grads(p, impl):
    def loss(p):
      logits = forward_core(p, config, tokens, pos, layout, attention_impl=impl).logits
      logp = jax.nn.log_softmax(logits[:, :length])
      nll = -jnp.take_along_axis(logp, x0[..., None], -1)[..., 0]
      return jnp.sum(nll * weight) / jnp.sum(weight)
    return jax.value_and_grad(loss)(p)

  (lx, gx), (lp, gp) = loss_and_grads(params, "xla"), loss_and_grads(params, "pallas")
  assert abs(float(lx) - float(lp)) <= 1e-5
  errs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(max_err, gx, gp))
  assert max(errs) <= 1e-5


# ---------------------------------------------------------------------------------------------
# TPU lowering (Mosaic) for realistic shapes: head_dim 128, block 32, 4k-32k context, bf16.
# ---------------------------------------------------------------------------------------------

def _spec_layout(batch, t):
  s = jax.ShapeDtypeStruct
  return masks.Layout(s((batch, t), jnp.int32), s((batch, t), jnp.bool_), s((batch, t), jnp.int32))


def _export_tpu(fn, *args) -> str:
  from jax import export
  return export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()


@pytest.mark.parametrize("context", [4096, 32768])
def test_tpu_export_inference(context):
  """Decode step: 32 window queries (16 heads) against context cache slots + the window."""
  s = jax.ShapeDtypeStruct
  tk = context + 32
  fn = lambda q, k, v, ql, kl: ba.block_diffusion_attention(q, k, v, ql, kl, interpret=False)
  text = _export_tpu(fn, s((1, 32, 16, 128), jnp.bfloat16), s((1, tk, 4, 128), jnp.bfloat16),
                     s((1, tk, 4, 128), jnp.bfloat16), _spec_layout(1, 32), _spec_layout(1, tk))
  assert text.count("tpu_custom_call") == 1


@pytest.mark.parametrize("context", [4096, 32768])
def test_tpu_export_inference_against_the_cache(context):
  """Decode step with the cache as operands: 20 stacked layers `[L, B, KV, S, d]` read by layer
  index; one Mosaic kernel, and the cache is neither concatenated, padded nor transposed."""
  s = jax.ShapeDtypeStruct
  cache = s((20, 1, 4, context, 128), jnp.bfloat16)

  def fn(q, k, v, ql, kl, ck, cv, cl, layer):
    return ba.block_diffusion_attention(q, k, v, ql, kl, cache_k=ck, cache_v=cv,
                                        cache_layout=cl, cache_index=layer, interpret=False)
  text = _export_tpu(fn, s((1, 32, 16, 128), jnp.bfloat16), s((1, 32, 4, 128), jnp.bfloat16),
                     s((1, 32, 4, 128), jnp.bfloat16), _spec_layout(1, 32), _spec_layout(1, 32),
                     cache, cache, _spec_layout(1, context), s((), jnp.int32))
  assert text.count("tpu_custom_call") == 1
  big = [line for line in text.splitlines() if f"x{context}x128x" in line
         and any(op in line for op in ("concatenate", "pad", "transpose", "dynamic_slice"))]
  assert not big, big


@pytest.mark.parametrize("context", [4096, 32768])
def test_tpu_export_training_forward_and_backward(context):
  """The 2L layout (2 x context tokens): forward + dq + dkv kernels."""
  s = jax.ShapeDtypeStruct
  t = 2 * context

  def fn(q, k, v, ql, kl):
    f = lambda q, k, v: jnp.sum(
        ba.block_diffusion_attention(q, k, v, ql, kl, interpret=False)
                                .astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  text = _export_tpu(fn, s((1, t, 16, 128), jnp.bfloat16), s((1, t, 4, 128), jnp.bfloat16),
                     s((1, t, 4, 128), jnp.bfloat16), _spec_layout(1, t), _spec_layout(1, t))
  assert text.count("tpu_custom_call") == 3


def _load_residuals_tool():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "attention_residuals.py")
  spec = importlib.util.spec_from_file_location("attention_residuals", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_backward_residuals_are_compact():
  """What the forward keeps for the backward (Mosaic kernel, shapes only): q, k, v, o, the
  log-sum-exp as one float32 per query row and head, the ids as [B, T] (no lane-replicated
  array); LLaDA2.1-mini's heads on a 2L layout of 1024 tokens."""
  tool = _load_residuals_tool()
  b, length, h, kv, d = 1, 512, 16, 4, 128
  rows = tool.residuals(b, length, 32, h, kv, d, jnp.bfloat16)
  t = 2 * length
  shapes = [r[0] for r in rows if len(r[0]) > 0]
  assert (b, kv, h // kv, t) in shapes  # the compact log-sum-exp
  assert not any(s and s[-1] == ba.NUM_LANES and dt == "float32" for s, dt, _ in rows)
  assert not any(len(s) >= 2 and s[-1] == 2 * ba.NUM_LANES for s, _, _ in rows)  # q ids
  tensors = 2 * (b * t * h * d * 2) + 2 * (b * t * kv * d * 2)  # q, o; k, v (bf16)
  total = sum(r[2] for r in rows)
  assert total - tensors <= b * t * (h * 4 + 6 * 4) + 64 * 1024  # lse, ids, step tables


# ---------------------------------------------------------------------------------------------
# Work accounting (tools/attention_work.py).
# ---------------------------------------------------------------------------------------------

def _load_tool():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "attention_work.py")
  spec = importlib.util.spec_from_file_location("attention_work", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_training_layout_executes_at_most_60_percent_of_dense():
  tool = _load_tool()
  row = tool.training_work(4096, 32, 128, 128, docs=1, exact=False)
  assert row["flops_frac"] <= 0.6
  assert row["skipped_frac"] >= 0.4
  json.dumps(row)  # the tool's rows are plain data
