"""The dropless expert implementations (model/moe.py) against `experts_ragged`: outputs and
gradients on random, skewed and edge-case routings, the static tile bound, the per-backend
choice behind `moe_impl="auto"`, and token/NFE exactness of the fixture generate runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llada_jax
from llada_jax import parallel
from llada_jax.model import moe
from conftest import FIXTURE_NAMES, expected_output, golden, run_kwargs

IMPLS = {
    "dense": moe.experts_dense,
    "auto_local": moe.experts_auto,
    **{f"tile_loop@{c}": functools.partial(moe.experts_tile_loop, tile=c) for c in (1, 3, 8, 64)},
    **{f"bucketed@{c}": functools.partial(moe.experts_bucketed, tile=c) for c in (1, 3, 8, 64)},
}


def _weights(e, d, f, key, dtype=jnp.float32):
  ks = jax.random.split(key, 3)
  return tuple((0.2 * jax.random.normal(k, s)).astype(dtype)
               for k, s in zip(ks, [(e, d, f), (e, d, f), (e, f, d)]))


def _routing(kind, n, k, e, key):
  if kind == "skewed":  # every token picks the same k experts (one expert gets all N copies)
    return jnp.tile(jnp.arange(e - k, e, dtype=jnp.int32)[::-1][None], (n, 1))
  if kind == "half":  # two disjoint sets of k experts
    a = jnp.arange(k, dtype=jnp.int32)
    return jnp.where((jnp.arange(n) % 2 == 0)[:, None], a, a + k)
  return jax.lax.top_k(jax.random.uniform(key, (n, e)), k)[1].astype(jnp.int32)


CASES = [  # (n, k, e, d, f, routing): one token, k = e, half the experts idle, many experts, skew
    (32, 4, 16, 24, 8, "uniform"), (33, 2, 8, 16, 8, "half"), (1, 2, 8, 16, 8, "uniform"),
    (7, 4, 4, 16, 8, "uniform"), (100, 8, 64, 16, 8, "uniform"), (64, 2, 8, 16, 8, "skewed"),
]


def _loss(fn, idx, w, x, gate, up, down):
  out = fn(x, idx, gate, up, down)
  return jnp.sum(jnp.einsum("nkd,nk->nd", out.astype(jnp.float32), w)
                 * jnp.cos(jnp.arange(out.shape[-1])))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_outputs_and_gradients_match_ragged(case):
  n, k, e, d, f, kind = case
  key = jax.random.PRNGKey(n * 1000 + e)
  ks = jax.random.split(key, 4)
  x = jax.random.normal(ks[0], (n, d))
  idx = _routing(kind, n, k, e, ks[1])
  w = jax.random.uniform(ks[2], (n, k))
  gate, up, down = _weights(e, d, f, ks[3])
  ref = moe.experts_ragged(x, idx, gate, up, down)
  grad = lambda fn: jax.jit(jax.grad(functools.partial(_loss, fn, idx, w), argnums=(0, 1, 2, 3)))
  gref = grad(moe.experts_ragged)(x, gate, up, down)
  for name, fn in IMPLS.items():
    out = jax.jit(fn)(x, idx, gate, up, down)
    assert out.shape == (n, k, d) and out.dtype == ref.dtype, name
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5,
                               err_msg=name)
    for a, b, what in zip(grad(fn)(x, gate, up, down), gref, ["x", "gate", "up", "down"]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4,
                                 err_msg=f"{name} d{what}")


@pytest.mark.parametrize("impl", ["tile_loop", "bucketed", "auto_local", "dense"])
def test_bfloat16_within_rounding_of_ragged(impl):
  n, k, e, d, f = 48, 4, 16, 32, 16
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(ks[0], (n, d)).astype(jnp.bfloat16)
  idx = _routing("uniform", n, k, e, ks[1])
  gate, up, down = _weights(e, d, f, ks[2], jnp.bfloat16)
  ref = moe.experts_ragged(x, idx, gate, up, down)
  out = jax.jit(moe.EXPERT_IMPLS[impl])(x, idx, gate, up, down)
  assert out.dtype == ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", ["tile_loop", "bucketed", "auto_local"])
def test_moe_block_matches_ragged_with_stats(impl):
  c = llada_jax.tiny_config(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
  p = llada_jax.init_params(c, jax.random.PRNGKey(0))
  layer = jax.tree.map(lambda a: a[0], p["moe"])
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 40, c.hidden_size))
  ref = moe.moe_block(layer, x, c, impl="ragged", return_stats=True)
  out = jax.jit(functools.partial(moe.moe_block, c=c, impl=impl, return_stats=True))(layer, x)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref[2]))
  np.testing.assert_array_equal(np.asarray(out[3]["tokens_per_expert"]),
                                np.asarray(ref[3]["tokens_per_expert"]))
  assert int(out[3]["dropped"]) == 0


_plan = jax.jit(moe._tile_plan, static_argnums=(1, 2))


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([1, 7, 16, 40]), k=st.integers(1, 4), e=st.sampled_from([1, 4, 24]),
       c=st.sampled_from([1, 3, 16, 48]), skew=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_max_tiles_bounds_every_routing(n, k, e, c, skew, seed):
  """No routing needs more tiles than the static bound (so nothing is ever dropped)."""
  k = min(k, e)
  rng = np.random.default_rng(seed)
  # a token picks k distinct experts, drawn from a distribution that skew makes peaky
  logits = rng.normal(size=e) * 10 * skew
  prob = np.exp(logits - logits.max())
  prob /= prob.sum()
  idx = np.stack([rng.choice(e, size=k, replace=False, p=prob) for _ in range(n)])
  c = min(c, n)
  plan = _plan(jnp.asarray(idx, jnp.int32), e, c)
  sizes = np.bincount(idx.reshape(-1), minlength=e)
  need = int(np.sum(-(-sizes // c)))
  assert int(plan[-1]) == need <= moe.max_tiles(n, k, e, c) == plan[2].shape[0]
  # every copy is in exactly one used tile, at the row the sort put it
  valid = np.asarray(plan[4])
  assert valid[:need].min(initial=c) >= 1 and valid[need:].sum() == 0 and valid.sum() == n * k


def test_max_tiles_is_reached():
  """The bound is tight for the routings that spread copies over the most experts."""
  n, k, e = 8, 2, 16  # 16 copies on 16 distinct experts, one tile each
  idx = jnp.arange(16, dtype=jnp.int32).reshape(n, k)
  assert int(moe._tile_plan(idx, e, 4)[-1]) == moe.max_tiles(n, k, e, 4) == 16
  assert moe.max_tiles(32, 4, 16, 32) == 16  # c >= N: one tile per expert at most


def test_choice_per_backend():
  mid = dict(k=4, e=16, d=256, f=128)
  assert moe.choose_experts(32, backend="tpu", **mid) == ("ragged", None)
  assert moe.choose_experts(4096, backend="tpu", **mid) == ("ragged", None)
  # CPU: the sorted tile loop at the mid-size model's decode and prefill sizes, tile ~ load
  assert moe.choose_experts(32, backend="cpu", **mid) == ("tile_loop", 8)
  assert moe.choose_experts(4096, backend="cpu", **mid) == ("tile_loop", 1024)
  # ... and at LLaDA2.1-mini expert widths with a decode window (1-row tiles: only the used
  # experts' weights are read)
  assert moe.choose_experts(32, 8, 256, 2048, 512, backend="cpu") == ("tile_loop", 1)
  # tiny experts and few tokens: dense all-experts is cheaper than a loop
  assert moe.choose_experts(16, 2, 8, 64, 32, backend="cpu")[0] == "dense"
  # GPU: no loop of small launches (dense, or one batched matmul over tiles)
  assert moe.choose_experts(32, backend="gpu", **mid)[0] == "dense"
  assert moe.choose_experts(4096, 8, 256, 2048, 512, 2, backend="gpu")[0] == "bucketed"
  for n in (1, 7, 32, 1000):
    assert 1 <= moe.tile_rows(n, 4, 16) <= n


def test_auto_resolves_per_backend(monkeypatch):
  assert parallel.resolve_moe_impl("auto") == "auto_local"  # this CPU
  assert parallel.resolve_moe_impl("auto", dropless=True) == "auto_local"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert parallel.resolve_moe_impl("auto") == "ragged"


def test_auto_local_dispatches_on_static_shapes(monkeypatch):
  """The choice happens at trace time from N, K, E, D, F (decode window vs prefill differ)."""
  seen = []
  real = moe.choose_experts

  def spy(*a, **kw):
    seen.append(real(*a, **kw))
    return seen[-1]

  monkeypatch.setattr(moe, "choose_experts", spy)
  gate, up, down = _weights(16, 256, 128, jax.random.PRNGKey(0))
  for n in (32, 1024):
    x = jnp.ones((n, 256))
    idx = _routing("uniform", n, 4, 16, jax.random.PRNGKey(n))
    jax.jit(moe.experts_auto)(x, idx, gate, up, down)
  assert seen == [("tile_loop", 8), ("tile_loop", 256)]


# The fixture models are tiny, so "auto" runs them dense (tests/test_decode.py); run every
# fixture generate() through the sorted tile loop too (decode windows and prefill), tokens and NFE
# exact.
ALL_RUNS = [(name, i) for name in FIXTURE_NAMES for i in range(len(golden(name).runs()))]


@pytest.mark.parametrize("name, i", ALL_RUNS,
                         ids=[f"{n}-{golden(n).runs()[i]['name']}" for n, i in ALL_RUNS])
def test_fixture_generate_runs_exact_with_tile_loop(name, i):
  g = golden(name)
  run = g.runs()[i]
  r = llada_jax.generate(g.params, g.config, [g.prompt], moe_impl="tile_loop",
                         **run_kwargs(g, run))
  assert r.output_ids[0] == expected_output(g, run)
  assert r.nfe[0] == run["nfe"]


@pytest.mark.parametrize("impl", ["bucketed", "dense"])
def test_fixture_generate_first_runs_exact(gold, impl):
  for run in gold.runs()[:3]:
    r = llada_jax.generate(gold.params, gold.config, [gold.prompt], moe_impl=impl,
                           **run_kwargs(gold, run))
    assert r.output_ids[0] == expected_output(gold, run) and r.nfe[0] == run["nfe"]


@pytest.mark.parametrize("impl", ["tile_loop", "auto_local", "dense", "ragged"])
def test_experts_read_in_place_from_the_stack(impl):
  """`moe_block(..., layer=i)` on the stacked `[L, E, ...]` experts (what decoding's
  `forward_core(experts_in_place=True)` runs) equals the block on layer i's own slice, bit for
  bit: in-place implementations index the stack, the others get the layer sliced out."""
  c = llada_jax.tiny_config(num_hidden_layers=4, first_k_dense_replace=1)
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  stack = params["moe"]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, c.hidden_size))
  for i in range(c.num_moe_layers):
    layer = jax.tree.map(lambda a: a[i], stack)
    p = {**layer, "experts": stack["experts"]}
    got = jax.jit(lambda p, x, i: moe.moe_block(p, x, c, impl=impl, layer=i)[0])(p, x, i)
    want = jax.jit(lambda p, x: moe.moe_block(p, x, c, impl=impl)[0])(layer, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("impl", ["tile_loop", "auto_local"])
def test_forward_with_experts_in_place_is_the_same_forward(impl):
  """The decode path's forward (experts read in place from the layer stack) returns the same
  logits and K/V as the differentiable forward that scans over sliced layers ("tile_loop" reads
  the stack in place; "auto_local" picks dense at these shapes and slices)."""
  from llada_jax import masks
  from llada_jax.model.transformer import forward_core
  c = llada_jax.tiny_config(num_hidden_layers=3)
  params = llada_jax.init_params(c, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, c.vocab_size - 2)
  pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  lay = masks.block_causal(pos, 4)
  run = lambda in_place: jax.jit(functools.partial(
      forward_core, c=c, moe_impl=impl, experts_in_place=in_place))(
          params, tokens=tokens, positions=pos, layout=lay)
  a, b = run(False), run(True)
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
  np.testing.assert_array_equal(np.asarray(a.kv["moe"]["k"]), np.asarray(b.kv["moe"]["k"]))
