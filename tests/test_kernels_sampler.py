"""Samplers fused with the LM head (`decode.update.sample_tiled`, the Pallas greedy kernel
`kernels.fused_sampler.greedy_head`) against the logits sampler `decode.update.sample`.

Greedy: tokens identical, confidences within `CONF_RTOL` (float32 rounding of the online sum;
measured <= 3.0e-7 relative here). Sampling: the filtered distribution exactly (a chi-square test
of the draws with fixed seeds, the support exactly, each draw's confidence its filtered
probability), the candidate filter against a float64 numpy model, the fallback bit-identical.
The decoder with the fused samplers reproduces every fixture run (tokens and NFE).
"""

import contextlib
import functools
import inspect

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings

import llada_jax
from llada_jax import masks
from llada_jax.decode import api, update
from llada_jax.decode.generate import StaticSpec
from llada_jax.decode.update import (get_sampler, head_logits, register_sampler, sample,
                                     sample_tiled, sampler_names)
from llada_jax.kernels.fused_sampler import greedy_head
from llada_jax.model.transformer import forward_core
from conftest import FIXTURE_NAMES, expected_output, golden, run_kwargs

CONF_RTOL = 1e-6
HYP = dict(derandomize=True, deadline=None, print_blob=True,
           suppress_health_check=[HealthCheck.too_slow])

# Small vocabulary tiles so the fixture vocabularies (512, 448) span several tiles, the last
# one shifted (448 = 3.5 x 128).
register_sampler("fused_tile128", functools.partial(sample_tiled, vocab_tile=128))


@functools.partial(jax.jit, static_argnames=("greedy",))
def _reference(hidden, lm_head, keys, t, k, p, *, greedy):
  return sample(head_logits(hidden, lm_head), keys, t, k, p, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("greedy", "vocab_tile", "max_candidates"))
def _tiled(hidden, lm_head, keys, t, k, p, *, greedy, vocab_tile, max_candidates=128):
  return sample_tiled(hidden, lm_head, keys, t, k, p, greedy=greedy, vocab_tile=vocab_tile,
                      max_candidates=max_candidates)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_vocab"))
def _kernel(hidden, lm_head, *, block_rows=256, block_vocab=1024):
  return greedy_head(hidden, lm_head, block_rows=block_rows, block_vocab=block_vocab)


def _random_head(seed, b, w, d, v, dtype=jnp.float32, scale=0.05):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((b, w, d)), dtype)
  lm_head = jnp.asarray(rng.standard_normal((d, v)) * scale, dtype)
  return hidden, lm_head


def _knobs(t=0.0, k=0, p=1.0):
  return jnp.float32(t), jnp.int32(k), jnp.float32(p)


def _assert_greedy_equal(got, want):
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=CONF_RTOL, atol=0)


# ---------------------------------------------------------------------------------------------
# Greedy: tokens identical, confidence within CONF_RTOL.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, w, d, v, tile, dtype", [
    (2, 8, 64, 512, 128, jnp.float32),
    (2, 8, 64, 448, 128, jnp.float32),  # last tile shifted
    (3, 5, 32, 1000, 300, jnp.float32),  # tile not a multiple of 128
    (2, 8, 64, 1000, 256, jnp.bfloat16),
    (2, 4, 64, 100, 8192, jnp.float32),  # one tile (tile > V)
])
def test_greedy_tiled_and_kernel_match_sample(b, w, d, v, tile, dtype):
  hidden, lm_head = _random_head(0, b, w, d, v, dtype)
  want = _reference(hidden, lm_head, None, *_knobs(), greedy=True)
  _assert_greedy_equal(_tiled(hidden, lm_head, None, *_knobs(), greedy=True, vocab_tile=tile),
                       want)
  _assert_greedy_equal(_kernel(hidden, lm_head, block_rows=8,
                               block_vocab=max(128, tile - tile % 128)), want)


@pytest.mark.slow
def test_greedy_at_llada21_vocab():
  """V = 157,184 (the real LLaDA2.1 vocabulary), D = 2048, a few rows: the default tiles of
  both implementations (19 full tiles + a shifted one for XLA; a partial last kernel tile)."""
  hidden, lm_head = _random_head(1, 2, 3, 2048, 157_184)
  want = _reference(hidden, lm_head, None, *_knobs(), greedy=True)
  _assert_greedy_equal(_tiled(hidden, lm_head, None, *_knobs(), greedy=True, vocab_tile=8192),
                       want)
  _assert_greedy_equal(_kernel(hidden, lm_head, block_vocab=16384), want)


def test_greedy_ties_go_to_the_lower_id_across_tiles():
  """Identical lm_head columns in different tiles (and inside one): `jnp.argmax`'s first id."""
  hidden, lm_head = _random_head(2, 1, 4, 16, 300)
  lm_head = np.asarray(lm_head).copy()
  best = int(np.argmax(np.asarray(head_logits(hidden, lm_head))[0, 0]))
  for dup in (299, 200, 150, best + 1 if best + 1 < 300 else 0):
    lm_head[:, dup] = lm_head[:, best]
  lm_head = jnp.asarray(lm_head)
  want = _reference(hidden, lm_head, None, *_knobs(), greedy=True)
  for tile in (64, 100, 128, 300):
    _assert_greedy_equal(_tiled(hidden, lm_head, None, *_knobs(), greedy=True, vocab_tile=tile),
                         want)
  _assert_greedy_equal(_kernel(hidden, lm_head, block_rows=8, block_vocab=128), want)


def _fixture_windows(g):
  """Final hidden states of real decode windows: the fixture prompt followed by masks, block 8."""
  c, params = g.config, g.params
  toks = np.full((1, 48), g.json["mask_id"], np.int32)
  toks[0, :len(g.prompt)] = g.prompt
  pos = jnp.arange(48, dtype=jnp.int32)[None]
  out = forward_core(params, c, jnp.asarray(toks), pos, masks.from_block_length(1, 48, 8),
                     with_logits=True, with_hidden=True)
  return out, params["lm_head"].astype(jnp.dtype(c.dtype))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_hidden_states(name):
  """On the fixture models' own hidden states: `head_logits` is the forward's logits bit for
  bit, and the fused samplers give its greedy tokens (confidence within CONF_RTOL)."""
  out, lm_head = _fixture_windows(golden(name))
  np.testing.assert_array_equal(np.asarray(head_logits(out.final_hidden, lm_head)),
                                np.asarray(out.logits))
  want = sample(out.logits, None, *_knobs(), greedy=True)
  for tile in (128, 8192):
    _assert_greedy_equal(_tiled(out.final_hidden, lm_head, None, *_knobs(), greedy=True,
                                vocab_tile=tile), want)
  _assert_greedy_equal(_kernel(out.final_hidden, lm_head, block_rows=16, block_vocab=128), want)


def test_kernel_interpret_params_simulated_tpu():
  from jax.experimental.pallas import tpu as pltpu
  hidden, lm_head = _random_head(3, 2, 8, 64, 384)
  got = greedy_head(hidden, lm_head, block_rows=8, block_vocab=128,
                    interpret=pltpu.InterpretParams(detect_races=True))
  _assert_greedy_equal(got, _reference(hidden, lm_head, None, *_knobs(), greedy=True))


def test_kernel_tpu_export():
  from jax import export
  s = jax.ShapeDtypeStruct
  fn = jax.jit(functools.partial(greedy_head, interpret=False))
  for dtype in (jnp.bfloat16, jnp.float32):
    exp = export.export(fn, platforms=("tpu",))(s((4, 32, 2048), dtype), s((2048, 157_184), dtype))
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") == 1 and "greedy_lm_head_sampler" in text
    assert "4x32x157184" not in text  # no logits


# ---------------------------------------------------------------------------------------------
# Sampling: the filtered distribution.
# ---------------------------------------------------------------------------------------------

def filtered_probs(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
  """SPEC 4.1's filtered distribution of one row of logits, in float64 numpy."""
  x = logits.astype(np.float64) / (t if t > 0 else 1.0)
  if k > 0:
    x = np.where(x < np.sort(x)[::-1][min(k, x.size) - 1], -np.inf, x)
  if p < 1.0:
    srt = np.sort(x)[::-1]
    e = np.exp(srt - srt[0])
    cum = np.cumsum(e / e.sum())
    remove = np.concatenate([[False], cum[:-1] > p])
    x = np.where(x < np.min(np.where(remove, np.inf, srt)), -np.inf, x)
  e = np.exp(x - x.max())
  return e / e.sum()


# (temperature, top_k, top_p, max_candidates): which path decides it is in the comment.
SAMPLING_CASES = [
    (0.7, 0, 1.0, 16),  # Gumbel-max over tiles
    (1.5, 0, 1.0, 16),  # Gumbel-max over tiles
    (1.0, 5, 1.0, 16),  # candidates: top-k
    (1.0, 0, 0.8, 16),  # candidates: top-p
    (1.3, 10, 0.9, 16),  # candidates: both
    (1.0, 40, 1.0, 16),  # top_k > K: fallback
    (1.0, 0, 0.999, 8),  # nucleus larger than K: fallback
    (0.8, 30, 0.95, 64),  # K >= V: the candidates are the whole vocabulary
]


@pytest.mark.parametrize("t, k, p, kcap", SAMPLING_CASES)
def test_sampling_distribution(t, k, p, kcap):
  """20,000 draws from one position's logits (V = 37 over tiles of 8): support exact, chi-square
  p-value > 1e-3 against the float64 filtered distribution, confidence = its probability."""
  d, v, b, w = 16, 37, 4, 5000
  rng = np.random.default_rng(7)
  h1 = rng.standard_normal((1, 1, d)).astype(np.float32)
  lm_head = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
  hidden = jnp.asarray(np.broadcast_to(h1, (b, w, d)))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(b))
  tok, conf = _tiled(hidden, lm_head, keys, *_knobs(t, k, p), greedy=False, vocab_tile=8,
                     max_candidates=kcap)
  probs = filtered_probs(np.asarray(head_logits(h1, lm_head))[0, 0], t, k, p)
  tok, conf = np.asarray(tok).ravel(), np.asarray(conf).ravel()
  counts = np.bincount(tok, minlength=v)
  support = probs > 0
  assert not np.any(counts[~support]), "drew a filtered-out token"
  if support.sum() > 1:
    chi = scipy.stats.chisquare(counts[support], probs[support] * tok.size)
    assert chi.pvalue > 1e-3, (chi, counts[support], probs[support] * tok.size)
  np.testing.assert_allclose(conf, probs[tok], rtol=CONF_RTOL, atol=1e-7)


def test_fallback_is_the_logits_sampler():
  """When the candidates cannot decide the filter, those rows run `sample` on their own logits
  with the same keys: the same draws (confidence within CONF_RTOL: the row's softmax sum is
  reduced in another order than the batch's)."""
  hidden, lm_head = _random_head(4, 3, 16, 32, 200, scale=0.02)  # flat: huge nucleus
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(3))
  for knobs in (_knobs(1.0, 0, 0.9), _knobs(0.5, 150, 1.0)):
    got = _tiled(hidden, lm_head, keys, *knobs, greedy=False, vocab_tile=64, max_candidates=32)
    _assert_greedy_equal(got, _reference(hidden, lm_head, keys, *knobs, greedy=False))
  # Only row 1 needs the fallback (its logits are flat); rows 0 and 2 keep their fast draws.
  hidden = hidden.at[0].mul(400.0).at[2].mul(400.0)
  knobs = _knobs(1.0, 0, 0.9)
  tok, conf = _tiled(hidden, lm_head, keys, *knobs, greedy=False, vocab_tile=64,
                     max_candidates=32)
  r_tok, r_conf = _reference(hidden, lm_head, keys, *knobs, greedy=False)
  _assert_greedy_equal((tok[1], conf[1]), (r_tok[1], r_conf[1]))
  for r in (0, 2):
    probs = np.stack([filtered_probs(x, 1.0, 0, 0.9)
                      for x in np.asarray(head_logits(hidden[r], lm_head))])
    assert np.all(probs[np.arange(16), np.asarray(tok[r])] > 0)
    np.testing.assert_allclose(np.asarray(conf[r]), probs[np.arange(16), np.asarray(tok[r])],
                               rtol=CONF_RTOL, atol=1e-7)


def test_peaked_filters_take_the_argmax():
  """top_k = 1 or a tiny top_p keeps only the argmax: token = greedy token, confidence 1."""
  hidden, lm_head = _random_head(5, 2, 8, 64, 1000)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(jnp.arange(2))
  greedy = _reference(hidden, lm_head, None, *_knobs(), greedy=True)[0]
  for knobs in (_knobs(0.7, 1, 1.0), _knobs(0.7, 0, 1e-6)):
    tok, conf = _tiled(hidden, lm_head, keys, *knobs, greedy=False, vocab_tile=256)
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(conf), 1.0)


@settings(max_examples=60, **HYP)
@given(seed=st.integers(0, 2**31 - 1), v=st.sampled_from([20, 50, 300]),
       levels=st.sampled_from([0, 3, 12]), top_k=st.integers(0, 40),
       top_p=st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.1]), kcap=st.sampled_from([4, 16, 64]))
def test_candidate_filter_matches_numpy(seed, v, levels, top_k, top_p, kcap):
  """`_filter_candidates` on the K largest of random logits (quantised to `levels` values for
  ties): where it says valid, the kept candidates are exactly SPEC 4.1's filtered set and that
  set has no member outside the candidates; with K >= V it is always valid."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4, v)).astype(np.float32) * 2
  if levels:
    x = np.round(x * levels / 4) * 4 / levels
  kk = min(kcap, v)
  b, _ = jax.lax.top_k(jnp.asarray(x), kk)
  m = b[:, 0]
  s = jnp.sum(jnp.exp(jnp.asarray(x) - m[:, None]), -1)
  keep, valid = update._filter_candidates(b, m, s, v, jnp.int32(top_k), jnp.float32(top_p))
  keep, valid, b = np.asarray(keep), np.asarray(valid), np.asarray(b)
  if kk == v:
    assert valid.all()
  for r in range(4):
    kept = filtered_probs(x[r], 1.0, top_k, top_p) > 0
    if valid[r]:
      thr = x[r][kept].min()
      np.testing.assert_array_equal(keep[r], b[r] >= thr)
      assert kept.sum() == keep[r].sum()


# ---------------------------------------------------------------------------------------------
# The decoder with the fused samplers.
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _sampler_impl(impl):
  """`generate` with `sampler_impl=impl`: passed straight through when the API has the keyword,
  else by giving the API's StaticSpec that default."""
  if "sampler_impl" in inspect.signature(llada_jax.generate).parameters:
    yield functools.partial(llada_jax.generate, sampler_impl=impl)
    return
  orig = api.StaticSpec
  api.StaticSpec = functools.partial(StaticSpec, sampler_impl=impl)
  try:
    yield llada_jax.generate
  finally:
    api.StaticSpec = orig


ALL_RUNS = [(name, i) for name in FIXTURE_NAMES for i in range(len(golden(name).runs()))]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["fused_tile128", "pallas"])
def test_decoder_with_fused_sampler_reproduces_all_fixture_runs(impl):
  """All 26 fixture `generate()` runs: identical tokens and NFE. ("fused" with its default
  tile, one tile at this vocabulary, runs every fixture run in `test_decode_cli_mesh.py`.)"""
  with _sampler_impl(impl) as generate:
    for name, i in ALL_RUNS:
      g = golden(name)
      run = g.runs()[i]
      r = generate(g.params, g.config, [g.prompt], **run_kwargs(g, run))
      assert r.output_ids[0] == expected_output(g, run), (name, run["name"])
      assert r.nfe[0] == run["nfe"], (name, run["name"])


PROMPTS = [[115, 454, 150, 236, 25, 310, 300], [9] * 13, [4, 5]]


def test_decoder_fused_batch_invariant_no_cache_mbe_and_sampling(tiny):
  """Batch-invariant rows, no-cache recompute, a 2-block MBE window, and top_k = 1 / tiny top_p
  sampling (one token kept, so deterministic): the same tokens and NFE as the logits sampler;
  sampling with a real filter is seeded."""
  kw = dict(gen_length=16, block_length=8, eos_early_stop=False, mode="speedy")
  for extra in (dict(batch_invariant=True, mbe_window=2),
                dict(use_cache=False, temperature=0.7, top_k=1),
                dict(temperature=1.3, top_p=1e-6)):
    with _sampler_impl("logits") as generate:
      want = generate(tiny.params, tiny.config, PROMPTS, **kw, **extra)
    with _sampler_impl("fused_tile128") as generate:
      got = generate(tiny.params, tiny.config, PROMPTS, **kw, **extra)
    assert got.output_ids == want.output_ids and got.nfe == want.nfe, extra
  with _sampler_impl("fused_tile128") as generate:
    skw = dict(kw, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(tiny.params, tiny.config, PROMPTS, seed=1, **skw)
    b = generate(tiny.params, tiny.config, PROMPTS, seed=1, **skw)
    c = generate(tiny.params, tiny.config, PROMPTS, seed=2, **skw)
    assert a.output_ids == b.output_ids and a.output_ids != c.output_ids


def test_decoder_program_holds_no_full_logits(tiny):
  """The lowered decode loop: `[B, W, V]` float32 logits with "logits", none with "fused"."""
  from llada_jax.decode.generate import Knobs, decode_jit
  from llada_jax.decode.settings import DecodeSettings
  c = tiny.config
  s = jax.ShapeDtypeStruct
  settings = DecodeSettings.for_mode("quality", gen_length=32, block_length=32).with_ids(
      c.eos_token_id, c.mask_token_id)
  abstract = lambda tree: jax.tree_util.tree_map(lambda x: s(x.shape, x.dtype), tree)
  texts = {}
  for impl in ("logits", "fused_tile128"):
    spec = StaticSpec(canvas_length=64, prompt_bucket=32, gen_length=32, block_length=32,
                      algorithm="llada2.1", mbe_window=1, greedy=True, trajectory=0,
                      sampler_impl=impl)
    texts[impl] = decode_jit.lower(
        abstract(tiny.params), c, s((2, 64), jnp.int32), s((2,), jnp.int32),
        s((2, 2), jnp.uint32), abstract(Knobs.from_settings(settings)), spec).as_text()
  full = f"2x32x{c.vocab_size}xf32"
  assert full in texts["logits"] and full not in texts["fused_tile128"]


def test_tpu_export_of_the_decoder_with_the_sampler_kernel(tiny):
  from jax import export
  from llada_jax.decode.generate import Knobs, decode_jit
  from llada_jax.decode.settings import DecodeSettings
  import llada_jax.kernels  # noqa: F401  (registers "pallas_tpu")
  c = tiny.config.replace(dtype="bfloat16")
  s = jax.ShapeDtypeStruct
  settings = DecodeSettings.for_mode("quality", gen_length=32, block_length=32).with_ids(
      c.eos_token_id, c.mask_token_id)
  abstract = lambda tree: jax.tree_util.tree_map(lambda x: s(x.shape, x.dtype), tree)
  spec = StaticSpec(canvas_length=64, prompt_bucket=32, gen_length=32, block_length=32,
                    algorithm="llada2.1", mbe_window=1, greedy=True, trajectory=0,
                    sampler_impl="pallas_tpu")
  text = export.export(decode_jit, platforms=("tpu",))(
      abstract(tiny.params), c, s((2, 64), jnp.int32), s((2,), jnp.int32),
      s((2, 2), jnp.uint32), abstract(Knobs.from_settings(settings)), spec).mlir_module()
  assert "greedy_lm_head_sampler" in text


def test_registry():
  assert {"logits", "fused", "pallas", "pallas_tpu"} <= set(sampler_names())
  assert get_sampler("pallas").__name__ == "pallas_sampler"
  with pytest.raises(ValueError, match="unknown sampler_impl"):
    get_sampler("nope")
