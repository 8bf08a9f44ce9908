"""The fused mask-fill/edit Pallas kernel: bit-identical to `decode.update.update_block`, and the
decoder with `attention_impl="pallas", update_impl="pallas"` reproduces the fixture runs."""

import functools
import json
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import llada_jax
from llada_jax.decode.update import get_update, update_block
from llada_jax.kernels.fused_update import fused_update_counts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HYP = dict(derandomize=True, deadline=None, print_blob=True,
           suppress_health_check=[HealthCheck.too_slow])

_kernel = jax.jit(fused_update_counts, static_argnames=("interpret",))
_reference = jax.jit(update_block)


def random_step(rng, batch, width, per_row_thresholds):
  """One step's inputs with many confidence ties and every threshold regime."""
  old = rng.integers(0, 6, (batch, width)).astype(np.int32)
  tok = np.where(rng.random((batch, width)) < 0.5, old,
                 rng.integers(0, 6, (batch, width))).astype(np.int32)
  levels = np.array([0.0, 0.1, 0.5, 0.5, 0.7, 0.9, 0.95, 1.0], np.float32)
  conf = np.where(rng.random((batch, width)) < 0.6, rng.choice(levels, (batch, width)),
                  rng.random((batch, width))).astype(np.float32)
  masked = rng.random((batch, width)) < rng.choice([0.0, 0.3, 0.7, 1.0])
  editable = ~masked & (rng.random((batch, width)) < 0.8)
  thr_choices = np.array([0.0, 0.5, 0.7, 0.9, 0.95, 1.0], np.float32)
  edit_choices = np.array([0.0, 0.5, 0.9, 1.01, np.inf], np.float32)
  if per_row_thresholds:
    thr, edit_thr = rng.choice(thr_choices, batch), rng.choice(edit_choices, batch)
  else:
    thr, edit_thr = np.float32(rng.choice(thr_choices)), np.float32(rng.choice(edit_choices))
  min_fill = rng.integers(0, width + 2, batch).astype(np.int32)
  return old, tok, conf, masked, editable, thr, edit_thr, min_fill


@settings(max_examples=40, **HYP)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(1, 8), (3, 8), (2, 32), (4, 24)]),
       per_row=st.booleans())
def test_bit_identical_to_update_block(seed, shape, per_row):
  args = random_step(np.random.default_rng(seed), *shape, per_row)
  new, m2t, t2t, fills, edits = _kernel(*args)
  r_new, r_m2t, r_t2t = _reference(*args)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(r_new))
  np.testing.assert_array_equal(np.asarray(m2t), np.asarray(r_m2t))
  np.testing.assert_array_equal(np.asarray(t2t), np.asarray(r_t2t))
  np.testing.assert_array_equal(np.asarray(fills), np.sum(np.asarray(r_m2t), -1))
  np.testing.assert_array_equal(np.asarray(edits), np.sum(np.asarray(r_t2t), -1))


def test_fallback_fills_best_masks_with_ties_to_lower_index():
  """Nothing passes the threshold: the min_fill best masks are filled (tie: lower index)."""
  old = np.full((1, 6), 9, np.int32)
  tok = np.arange(6, dtype=np.int32)[None]
  conf = np.array([[0.3, 0.5, 0.5, 0.1, 0.5, 0.2]], np.float32)
  masked = np.array([[True, False, True, True, True, True]])
  new, m2t, t2t, fills, edits = _kernel(old, tok, conf, masked, ~masked, 0.9, np.inf,
                                        np.array([2], np.int32))
  np.testing.assert_array_equal(np.asarray(m2t)[0], [False, False, True, False, True, False])
  np.testing.assert_array_equal(np.asarray(new)[0], [9, 9, 2, 9, 4, 9])
  assert int(fills[0]) == 2 and int(edits[0]) == 0


def test_registered_impl_matches_signature_and_outputs():
  args = random_step(np.random.default_rng(0), 2, 16, True)
  impl = get_update("pallas")
  for got, ref in zip(impl(*args), update_block(*args)):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_interpret_params_simulated_tpu():
  from jax.experimental.pallas import tpu as pltpu
  args = random_step(np.random.default_rng(1), 2, 8, True)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  got = fused_update_counts(*args, interpret=params)
  for g, r in zip(got[:3], update_block(*args)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_tpu_export():
  from jax import export
  s = jax.ShapeDtypeStruct
  b, w = 8, 32
  fn = jax.jit(functools.partial(fused_update_counts, interpret=False))
  exp = export.export(fn, platforms=("tpu",))(
      s((b, w), jnp.int32), s((b, w), jnp.int32), s((b, w), jnp.float32), s((b, w), jnp.bool_),
      s((b, w), jnp.bool_), s((), jnp.float32), s((b,), jnp.float32), s((b,), jnp.int32))
  assert exp.mlir_module().count("tpu_custom_call") == 1


def test_tpu_export_of_the_decoder_with_both_kernels():
  """The whole jitted decode loop, bf16, block 32, with `"pallas_tpu"` (Mosaic, never
  interpreted) attention and update: both kernels appear as TPU custom calls."""
  from jax import export
  from llada_jax.decode.generate import Knobs, StaticSpec, decode_jit
  from llada_jax.decode.settings import DecodeSettings
  import llada_jax.kernels  # noqa: F401  (registers "pallas_tpu")
  s = jax.ShapeDtypeStruct
  config, params = llada_jax.load_hf_checkpoint(os.path.join(FIXTURES, "llada2_tiny"))
  config = config.replace(dtype="bfloat16")
  abstract = lambda tree: jax.tree_util.tree_map(lambda x: s(x.shape, x.dtype), tree)
  settings = DecodeSettings.for_mode("quality", gen_length=64, block_length=32).with_ids(
      config.eos_token_id, config.mask_token_id)
  spec = StaticSpec(canvas_length=96, prompt_bucket=32, gen_length=64, block_length=32,
                    algorithm="llada2.1", mbe_window=1, greedy=True, trajectory=0,
                    attention_impl="pallas_tpu", update_impl="pallas_tpu")
  text = export.export(decode_jit, platforms=("tpu",))(
      abstract(params), config, s((2, 96), jnp.int32), s((2,), jnp.int32), s((2, 2), jnp.uint32),
      abstract(Knobs.from_settings(settings)), spec).mlir_module()
  assert "tpu_custom_call" in text
  assert "fused_mask_fill_edit_update" in text and "block_diffusion_attention_fwd" in text


# ---------------------------------------------------------------------------------------------
# The decoder with both kernels against the fixture generate runs.
# ---------------------------------------------------------------------------------------------

def _load(name):
  d = os.path.join(FIXTURES, name)
  config, params = llada_jax.load_hf_checkpoint(d)
  with open(os.path.join(d, "golden.json")) as f:
    gold = json.load(f)
  prompt = np.load(os.path.join(d, "golden.npz"))["gen_prompt_ids"].tolist()
  return config, params, gold, prompt


def _generate(config, params, gold, prompt, run):
  kw = dict(run["params"])
  v21 = run["name"].startswith("v21")
  if v21:
    kw.pop("steps", None)
  res = llada_jax.generate(params, config, [prompt], algorithm="llada2.1" if v21 else "llada2.0",
                           mask_id=gold["mask_id"], attention_impl="pallas",
                           update_impl="pallas", **kw)
  want = run["output_ids"]
  if run["name"].startswith("v20") and kw.get("eos_early_stop"):
    assert want[:len(prompt)] == prompt
    want = want[len(prompt):]
  return res, want


# Representative runs: LLaDA2.1 editing (quality / speedy / num_to_transfer 2), LLaDA2.1 and 2.0
# EOS early stop, LLaDA2.0 threshold + schedule (also one whose steps do not divide the block, on
# 4 query heads sharing 1 KV head). Runs of one (fixture, algorithm) share one compilation.
RUNS = [("llada2_tiny", ["v21_quality_like", "v21_speedy_like", "v21_num_to_transfer2",
                         "v21_eos_early_stop", "v20_t095_steps8", "v20_t05_steps2",
                         "v20_eos_pick_early_stop"]),
        ("llada2_tiny_groups", ["v20_t08_steps3", "v20_eos_pick_no_early_stop"])]


@pytest.mark.parametrize("name,runs", RUNS, ids=[r[0] for r in RUNS])
def test_decoder_with_pallas_kernels_reproduces_fixture_runs(name, runs):
  config, params, gold, prompt = _load(name)
  by_name = {r["name"]: r for r in gold["generate"]}
  for run_name in runs:
    run = by_name[run_name]
    res, want = _generate(config, params, gold, prompt, run)
    assert res.output_ids[0] == want, run_name
    assert res.nfe[0] == run["nfe"], run_name
