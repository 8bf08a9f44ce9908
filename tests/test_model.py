"""Forward parity with the reference PyTorch implementation (golden fixtures)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llada_jax
from llada_jax.model import layers, params as params_lib
from llada_jax.model.moe import route

MASKS = [(4, "block4"), (8, "block8"), (None, "full")]


@pytest.mark.parametrize("block_length, key", MASKS)
@pytest.mark.parametrize("moe_impl", ["ragged", "dense"])
def test_logits_match_reference(gold, block_length, key, moe_impl):
  ids = gold.npz["fwd_input_ids"][None]
  logits = llada_jax.forward(gold.params, gold.config, ids, block_length=block_length,
                             moe_impl=moe_impl)
  assert logits.dtype == jnp.float32 and logits.shape == (1, 16, gold.config.vocab_size)
  np.testing.assert_allclose(np.asarray(logits[0]), gold.npz[f"fwd_{key}_logits"], atol=1e-4,
                             rtol=0)


def test_hidden_states_and_router_match_reference(gold):
  ids = gold.npz["fwd_input_ids"][None]
  out = llada_jax.forward(gold.params, gold.config, ids, block_length=4, return_all=True)
  hs = np.asarray(out.hidden_states[:, 0])
  assert hs.shape == gold.npz["fwd_block4_hidden_states"].shape
  np.testing.assert_allclose(hs, gold.npz["fwd_block4_hidden_states"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out.router_logits[:, 0]),
                             gold.npz["fwd_block4_router_logits"], atol=1e-5, rtol=0)
  ours = np.sort(np.asarray(out.router_idx[:, 0]), axis=-1)
  ref = np.sort(gold.npz["fwd_block4_router_topk_idx"], axis=-1)
  np.testing.assert_array_equal(ours, ref)
  # We also reproduce the reference order (descending bias-corrected score).
  np.testing.assert_array_equal(np.asarray(out.router_idx[:, 0]),
                                gold.npz["fwd_block4_router_topk_idx"])


def test_bf16_compute_is_close(tiny):
  """bf16 params and compute: logits stay within a bf16-sized error of the fp32 reference."""
  ids = tiny.npz["fwd_input_ids"][None]
  c16 = tiny.config.replace(param_dtype="bfloat16", dtype="bfloat16")
  p16 = params_lib.cast_params(tiny.params, c16)
  logits = np.asarray(llada_jax.forward(p16, c16, ids, block_length=4)[0])
  ref = tiny.npz["fwd_block4_logits"]
  err = np.abs(logits - ref).max()
  assert err < 0.1 * np.abs(ref).max(), err
  assert (np.argmax(logits, -1) == np.argmax(ref, -1)).mean() >= 0.75


def test_batch_rows_are_independent(tiny):
  ids = tiny.npz["fwd_input_ids"]
  other = (ids * 7 + 3) % tiny.config.vocab_size
  both = llada_jax.forward(tiny.params, tiny.config, np.stack([ids, other]), block_length=4)
  np.testing.assert_allclose(np.asarray(both[0]), tiny.npz["fwd_block4_logits"], atol=1e-4)


def test_position_ids_are_relative(tiny):
  """RoPE is relative: a uniform shift keeps the logits; permuted positions change them."""
  ids = tiny.npz["fwd_input_ids"][None]
  a = np.asarray(llada_jax.forward(tiny.params, tiny.config, ids, block_length=4))
  b = llada_jax.forward(tiny.params, tiny.config, ids, block_length=4,
                        position_ids=np.arange(16)[None] + 5)
  c = llada_jax.forward(tiny.params, tiny.config, ids, block_length=4,
                        position_ids=np.arange(16)[None] * 3)
  assert np.abs(a - np.asarray(b)).max() < 1e-3
  assert np.abs(a - np.asarray(c)).max() > 1e-2


def test_partial_rope_matches_rotate_half_formula():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
  pos = np.array([[0, 1, 7]])
  cos, sin = layers.rope_cos_sin(jnp.asarray(pos), 4, 10000.0, jnp.float32)
  out = np.asarray(layers.apply_partial_rope(jnp.asarray(x), cos, sin))
  inv = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
  for t in range(3):
    ang = pos[0, t] * inv
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[0, t, :, :2], x[0, t, :, 2:4]
    np.testing.assert_allclose(out[0, t, :, :2], a * c - b * s, atol=1e-6)
    np.testing.assert_allclose(out[0, t, :, 2:4], b * c + a * s, atol=1e-6)
    np.testing.assert_array_equal(out[0, t, :, 4:], x[0, t, :, 4:])


def test_router_group_limit_and_weights():
  c = llada_jax.tiny_config(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((32, c.hidden_size)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((c.hidden_size, 8)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(8) * 0.1, jnp.float32)
  logits, idx, weights = route(x, w, bias, c)
  idx = np.asarray(idx)
  # topk_group=1: both chosen experts come from the same group of 2.
  assert (idx[:, 0] // 2 == idx[:, 1] // 2).all()
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  chosen = np.take_along_axis(p, idx, 1)
  np.testing.assert_allclose(np.asarray(weights), chosen / chosen.sum(1, keepdims=True) * 2.5,
                             rtol=1e-6)


def test_ragged_and_dense_experts_agree_on_random_model():
  c = llada_jax.tiny_config(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
  p = llada_jax.init_params(c, jax.random.PRNGKey(0))
  ids = np.random.default_rng(0).integers(0, c.vocab_size, (2, 24))
  a = llada_jax.forward(p, c, ids, block_length=8, moe_impl="ragged")
  b = llada_jax.forward(p, c, ids, block_length=8, moe_impl="dense")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((16,), np.int32), "must be \\[batch, length\\]"),
    (np.zeros((1, 600), np.int32), "exceeds max_position_embeddings"),
    (np.zeros((1, 4), np.float32), "must be integers"),
])
def test_forward_rejects_bad_input(tiny, bad, msg):
  with pytest.raises(ValueError, match=msg):
    llada_jax.forward(tiny.params, tiny.config, bad)


def test_forward_rejects_unknown_impl(tiny):
  with pytest.raises(ValueError, match="unknown attention_impl"):
    llada_jax.forward(tiny.params, tiny.config, np.zeros((1, 4), np.int32),
                      attention_impl="nope")


@pytest.mark.parametrize("preset, lo, hi", [("llada2_0_mini", 14e9, 18e9),
                                            ("llada2_1_flash", 95e9, 110e9)])
def test_full_size_param_count_without_allocation(preset, lo, hi):
  c = llada_jax.get_preset(preset)
  shapes = jax.eval_shape(lambda k: llada_jax.init_params(c, k), jax.random.PRNGKey(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert n == params_lib.count_params(c) == params_lib.count_params_analytic(c)
  assert lo < n < hi, n
  print(f"{preset}: {n / 1e9:.2f}B parameters")


def test_param_logical_axes_cover_every_leaf():
  c = llada_jax.tiny_config()
  axes = params_lib.logical_axes(c)
  shapes = params_lib.param_shapes(c)
  for (path, shape), ax in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                               jax.tree_util.tree_leaves(axes, is_leaf=lambda x:
                                                          isinstance(x, tuple))):
    assert len(ax) == len(shape.shape), path


@pytest.mark.parametrize("moe_impl", ["tile_loop", "bucketed", "auto"])
def test_logits_match_reference_with_sorted_tiles_and_auto(gold, moe_impl):
  ids = gold.npz["fwd_input_ids"][None]
  for block_length, key in MASKS:
    logits = llada_jax.forward(gold.params, gold.config, ids, block_length=block_length,
                               moe_impl=moe_impl)
    np.testing.assert_allclose(np.asarray(logits[0]), gold.npz[f"fwd_{key}_logits"], atol=1e-4,
                               rtol=0)


def test_sorted_tile_gradients_match_ragged_on_random_model():
  """Training differentiates through moe_impl: the tile loop's custom VJP against ragged_dot's."""
  c = llada_jax.tiny_config(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
  p = llada_jax.init_params(c, jax.random.PRNGKey(0))
  ids = np.random.default_rng(0).integers(0, c.vocab_size, (2, 24))
  loss = lambda p, impl: jnp.mean(jax.nn.log_softmax(
      llada_jax.forward(p, c, ids, block_length=8, moe_impl=impl))[..., 0])
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  ref = grad(p, "ragged")
  for impl in ("tile_loop", "bucketed", "auto"):
    got = grad(p, impl)
    for path, a in jax.tree_util.tree_leaves_with_path(got):
      b = functools.reduce(lambda t, k: t[k.key], path, ref)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=2e-3,
                                 err_msg=f"{impl} {jax.tree_util.keystr(path)}")
