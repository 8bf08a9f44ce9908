"""The LLaDA2 MoE block: sigmoid router with expert bias and group-limited top-k, routed SwiGLU
experts, and shared experts.

Routed-expert implementations (`moe_impl`), all dropless: "ragged" (`lax.ragged_dot`, the
grouped matmul: TPU), "dense" (every expert on every token), "tile_loop" (copies sorted by
expert, a loop over fixed-height tiles of the used experts: CPU), "bucketed" (the same tiles as
one batched matmul) and "auto_local" (one of these per backend and static shape,
`choose_experts`; what `moe_impl="auto"` resolves to without a mesh off TPU)."""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.model.layers import swiglu


def route(x: jax.Array, weight: jax.Array, expert_bias: jax.Array, c: ModelConfig):
  """Chooses experts per token (SPEC 1.1 MoE steps 1-5).

  Args:
    x: `[N, D]` tokens. weight: `[D, E]` router weight. expert_bias: `[E]`.
  Returns:
    logits `[N, E]` float32 (pre-sigmoid), idx `[N, K]` int32 chosen experts in descending order
    of the bias-corrected score, weights `[N, K]` float32 (normalised unbiased scores times
    routed_scaling_factor).
  """
  n = x.shape[0]
  e, g = c.num_experts, c.n_group
  logits = jnp.dot(x.astype(jnp.float32), weight.astype(jnp.float32))
  scores = jax.nn.sigmoid(logits)
  biased = scores + expert_bias.astype(jnp.float32)
  group_scores = jax.lax.top_k(biased.reshape(n, g, e // g), 2)[0].sum(-1)
  _, top_groups = jax.lax.top_k(group_scores, c.topk_group)
  keep_group = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
  keep = jnp.repeat(keep_group, e // g, axis=1)
  _, idx = jax.lax.top_k(jnp.where(keep, biased, -jnp.inf), c.num_experts_per_tok)
  w = jnp.take_along_axis(scores, idx, axis=1)
  if c.num_experts_per_tok > 1:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return logits, idx.astype(jnp.int32), w * c.routed_scaling_factor


def experts_ragged(x: jax.Array, idx: jax.Array, gate, up, down) -> jax.Array:
  """Dropless grouped matmul: `[N, D]` tokens, `[N, K]` experts -> `[N, K, D]` expert outputs.

  Token copies are sorted by expert and run through `lax.ragged_dot` (one group per expert).
  """
  n, k = idx.shape
  e = gate.shape[0]
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = x[order // k]
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  ys = jax.lax.ragged_dot(h, down, sizes)
  return jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)


def experts_dense(x: jax.Array, idx: jax.Array, gate, up, down) -> jax.Array:
  """Reference: every expert on every token, then pick. `[N, D]`, `[N, K]` -> `[N, K, D]`."""
  all_out = jax.vmap(lambda g, u, d: swiglu(x, g, u, d), out_axes=1)(gate, up, down)
  return jnp.take_along_axis(all_out, idx[:, :, None], axis=1)


# ---- sorted tiles: token copies sorted by expert, each expert's run cut into tiles of C rows ----
#
# With M = N * K copies and U <= min(E, M) experts in use, expert e's l_e copies take
# ceil(l_e / C) tiles, so there are at most (M + U * (C - 1)) // C tiles (and at most
# E * ceil(N / C): a token picks an expert once): a static bound on the tile count that holds for
# every routing, i.e. dropless by construction. Only the padding of each expert's last tile is
# wasted work (at most C - 1 rows per expert in use), instead of E / K x (dense) or E x
# (capacity C = N for every expert).


def max_tiles(n: int, k: int, e: int, c: int) -> int:
  """The most tiles of `c` rows that any routing of `n` tokens to `k` of `e` experts needs."""
  m = n * k
  return max(1, min((m + min(e, m) * (c - 1)) // c, e * -(-n // c)))


def _tile_plan(idx: jax.Array, e: int, c: int):
  """Sorts the `[N, K]` copies by expert and cuts each expert's run into tiles of `c` rows.

  Returns (order [M] copy index of each sorted row, inverse [M] sorted row of each copy,
  tile_expert [G], tile_row [G] first sorted row of the tile, tile_valid [G] rows of the tile
  that belong to its expert (0 for the unused tiles past num_tiles), num_tiles []).
  Tiles are in ascending row order; an unused tile starts at row M (the padding)."""
  n, k = idx.shape
  m = n * k
  g = max_tiles(n, k, e, c)
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  inverse = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  group_start = jnp.cumsum(sizes) - sizes
  tiles = (sizes + c - 1) // c
  tile_end = jnp.cumsum(tiles)
  num_tiles = tile_end[-1]
  j = jnp.arange(g, dtype=jnp.int32)
  te = jnp.minimum(jnp.searchsorted(tile_end, j, side="right"), e - 1).astype(jnp.int32)
  local = j - (tile_end[te] - tiles[te])
  used = j < num_tiles
  tile_row = jnp.where(used, group_start[te] + c * local, m).astype(jnp.int32)
  tile_valid = jnp.where(used, jnp.clip(sizes[te] - c * local, 0, c), 0).astype(jnp.int32)
  return order, inverse, te, tile_row, tile_valid, num_tiles


def _sorted_slots(idx: jax.Array, order: jax.Array, e: int, c: int) -> jax.Array:
  """Row of each sorted copy in the `[G * c]` tile buffer (tile * c + rank in the tile)."""
  flat = idx.reshape(-1)
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  tiles = (sizes + c - 1) // c
  se = flat[order]
  rank = jnp.arange(flat.shape[0], dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[se]
  return ((jnp.cumsum(tiles) - tiles)[se] + rank // c) * c + rank % c


def _swiglu_parts(xt, g, u):
  a = xt @ g
  b = xt @ u
  return a, b, jax.nn.silu(a) * b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tile_loop_ffn(c, xs, tile_expert, tile_row, tile_valid, num_tiles, gate, up, down):
  """SwiGLU experts over the used tiles, one tile at a time (`lax.fori_loop`, trip count
  `num_tiles`): `xs` `[M + C, D]` sorted copies (C rows of zero padding) -> `[M + C, D]`.

  A tile's rows past its `tile_valid` belong to the next expert (or the padding); they are
  computed with this tile's expert and overwritten by a later tile (tiles run in row order)."""
  return _tile_loop_fwd(c, xs, tile_expert, tile_row, tile_valid, num_tiles, gate, up, down)[0]


def _expert_weight(w: jax.Array, ex: jax.Array, layer) -> jax.Array:
  """Expert `ex`'s matrix of `w` `[E, ...]`, or of layer `layer` of a stack `[L, E, ...]` (read
  in place from the stack: a scan over layers that sliced the layer out first would copy all
  of its experts' weights every call)."""
  if layer is None:
    return jax.lax.dynamic_index_in_dim(w, ex, keepdims=False)
  start = (layer, ex) + (0,) * (w.ndim - 2)
  return jax.lax.dynamic_slice(w, start, (1, 1) + w.shape[2:]).reshape(w.shape[2:])


def _tile_loop_fwd(c, xs, tile_expert, tile_row, tile_valid, num_tiles, gate, up, down,
                   layer=None):
  d = xs.shape[1]
  dtype = jnp.result_type(xs.dtype, gate.dtype, up.dtype, down.dtype)

  def body(i, ys):
    ex, row = tile_expert[i], tile_row[i]
    xt = jax.lax.dynamic_slice_in_dim(xs, row, c)
    g, u, dn = (_expert_weight(w, ex, layer) for w in (gate, up, down))
    yt = (_swiglu_parts(xt, g, u)[2] @ dn).astype(dtype)
    return jax.lax.dynamic_update_slice_in_dim(ys, yt, row, 0)

  ys = jax.lax.fori_loop(0, num_tiles, body, jnp.zeros((xs.shape[0], d), dtype))
  return ys, (xs, tile_expert, tile_row, tile_valid, num_tiles, gate, up, down)


def _tile_loop_bwd(c, res, dys):
  xs, tile_expert, tile_row, tile_valid, num_tiles, gate, up, down = res
  acc = lambda w: jnp.promote_types(w.dtype, jnp.float32)
  rows = jnp.arange(c)[:, None]

  def body(i, carry):
    dxs, dg, du, dd = carry
    ex, row = tile_expert[i], tile_row[i]
    xt = jax.lax.dynamic_slice_in_dim(xs, row, c)
    dyt = jax.lax.dynamic_slice_in_dim(dys, row, c)
    dyt = jnp.where(rows < tile_valid[i], dyt, 0)  # rows of the next expert: not this tile's
    g, u, dn = (_expert_weight(w, ex, None) for w in (gate, up, down))
    a, b, h = _swiglu_parts(xt, g, u)
    dh = dyt @ dn.T
    sig = jax.nn.sigmoid(a)
    da = dh * b * sig * (1 + a * (1 - sig))
    db = dh * a * sig
    dxt = (da @ g.T + db @ u.T).astype(dxs.dtype)

    def add(acc_, upd):
      cur = jax.lax.dynamic_index_in_dim(acc_, ex, keepdims=True)
      return jax.lax.dynamic_update_index_in_dim(acc_, cur + upd.astype(acc_.dtype)[None], ex, 0)

    return (jax.lax.dynamic_update_slice_in_dim(dxs, dxt, row, 0),
            add(dg, xt.T @ da), add(du, xt.T @ db), add(dd, h.T @ dyt))

  init = (jnp.zeros_like(xs), jnp.zeros(gate.shape, acc(gate)), jnp.zeros(up.shape, acc(up)),
          jnp.zeros(down.shape, acc(down)))
  dxs, dg, du, dd = jax.lax.fori_loop(0, num_tiles, body, init)
  return (dxs, None, None, None, None, dg.astype(gate.dtype), du.astype(up.dtype),
          dd.astype(down.dtype))


_tile_loop_ffn.defvjp(_tile_loop_fwd, _tile_loop_bwd)


def experts_tile_loop(x: jax.Array, idx: jax.Array, gate, up, down, *, tile: int | None = None,
                      layer=None) -> jax.Array:
  """Dropless sorted tiles run one at a time: `[N, D]`, `[N, K]` -> `[N, K, D]`.

  Copies are sorted by expert and each expert's run is cut into tiles of `tile` rows (default:
  `tile_rows`); a loop over the tiles in use reads each used expert's weights once per tile and
  runs three `[C, D] x [D, F]`-sized matmuls. Work: the copies plus each used expert's last-tile
  padding; no work for unused experts. The fastest dropless path on CPU (see `experts_auto`).
  `layer` (an int32 scalar): gate/up/down are the stacks `[L, E, ...]` of every layer and the
  tiles read layer `layer`'s experts in place (inference only: not differentiable)."""
  n, k = idx.shape
  e, d, f = gate.shape[-3:]
  if n * k == 0:
    return experts_dense(x, idx, *_layer_of((gate, up, down), layer))
  c = min(tile or tile_rows(n, k, e), n)
  order, inverse, te, row, valid, num = _tile_plan(idx, e, c)
  xs = jnp.concatenate([x[order // k], jnp.zeros((c, x.shape[1]), x.dtype)])
  if layer is None:
    ys = _tile_loop_ffn(c, xs, te, row, valid, num, gate, up, down)
  else:
    ys = _tile_loop_fwd(c, xs, te, row, valid, num, gate, up, down, layer)[0]
  return ys[inverse].reshape(n, k, -1)


def _layer_of(weights: tuple, layer) -> tuple:
  """The `[E, ...]` matrices of layer `layer` of stacked weights (all of `weights` when None)."""
  if layer is None:
    return weights
  return tuple(jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for w in weights)


def experts_bucketed(x: jax.Array, idx: jax.Array, gate, up, down, *, tile: int | None = None
                     ) -> jax.Array:
  """Dropless sorted tiles as one batched matmul: `[N, D]`, `[N, K]` -> `[N, K, D]`.

  The same tiles as `experts_tile_loop`, gathered into a `[G, C, D]` buffer (G = `max_tiles`,
  static) and multiplied with the tiles' experts' weights gathered to `[G, D, F]`: no loop, so
  unused tiles (zeros) are computed too, and the weights are copied once per tile."""
  n, k = idx.shape
  e, d, f = gate.shape
  m = n * k
  if m == 0:
    return experts_dense(x, idx, gate, up, down)
  c = min(tile or tile_rows(n, k, e), n)
  order, inverse, te, row, valid, _ = _tile_plan(idx, e, c)
  g = te.shape[0]
  r = jnp.arange(c, dtype=jnp.int32)
  pos = jnp.minimum(row[:, None] + r, m - 1)
  xs = x[order // k]
  buf = jnp.where((r < valid[:, None])[..., None], xs[pos], 0)
  h = (jax.nn.silu(jnp.einsum("gcd,gdf->gcf", buf, gate[te]))
       * jnp.einsum("gcd,gdf->gcf", buf, up[te]))
  y = jnp.einsum("gcf,gfd->gcd", h, down[te]).reshape(g * c, -1)
  return y[_sorted_slots(idx, order, e, c)[inverse]].reshape(n, k, -1)


# ---- choosing an implementation from the static shapes ----------------------------------------
#
# `moe_impl="auto"` without a mesh: on TPU "ragged" (the grouped matmul). On CPU "dense" or
# "tile_loop", whichever a small cost model fitted to tools/bench_moe.py sweeps (2-core x86,
# float32; rms error ~1.6x, but the choices it makes are within 1.3x of the best measured one on
# every swept size, mostly the best) says is cheaper; on GPU "dense" or "bucketed" (one batched
# matmul: no loop of small launches), from a bandwidth/FLOP model (not measured). The tile height
# is the power of two nearest the mean load per expert N*K/E (measured within 1.3x of the best).

# CPU: a tile costs a loop step plus its rows' FLOPs; the used experts' weights are read once;
# dense computes every expert on every token and writes [N, E, F] / [N, E, D] intermediates.
_CPU = dict(tile_base_s=35e-6, tile_step_s=6e-6, tile_flops=43e9, dense_base_s=15e-6,
            dense_flops=60e9, weight_bytes_per_s=4.3e9, act_bytes_per_s=14e9)
# GPU (a guess: H100/H200-class, bf16): everything is static shapes, so the bucketed path pays
# for all `max_tiles` tiles and copies their weights (gather) once.
_GPU = dict(flops=200e12, bytes_per_s=2.5e12, launch_s=10e-6)


def _binomial_pmf(n: int, p: float):
  """(loads, probabilities) of Binomial(n, p) over mean +- 12 sd (the rest is negligible)."""
  mean, sd = n * p, math.sqrt(n * p * (1 - p))
  lo, hi = max(0, int(mean - 12 * sd) - 1), min(n, int(mean + 12 * sd) + 2)
  loads = np.arange(lo, hi + 1)
  lg = np.vectorize(math.lgamma)
  logp = (math.lgamma(n + 1) - lg(loads + 1) - lg(n - loads + 1) + loads * math.log(p)
          + (n - loads) * math.log1p(-p))
  return loads, np.exp(logp)


def expected_tiles(n: int, k: int, e: int, c: int) -> float:
  """Expected tiles of `c` rows when each of `n` tokens picks `k` of `e` experts uniformly (an
  expert's load is Binomial(n, k/e))."""
  if k >= e:
    return float(e * -(-n // c))
  loads, prob = _binomial_pmf(n, k / e)
  return float(e * np.sum(prob * np.ceil(loads / c)))


def tile_rows(n: int, k: int, e: int) -> int:
  """Default tile height: the power of two nearest the mean load per expert, in [1, n]."""
  mean = max(1.0, n * k / e)
  return int(min(max(1, n), 2 ** round(math.log2(mean))))


def expert_costs(n: int, k: int, e: int, d: int, f: int, itemsize: int = 4,
                 backend: str = "cpu") -> dict[str, tuple[float, int | None]]:
  """Modelled seconds per call of each candidate for `backend` ("cpu" or "gpu"):
  {name: (seconds, tile rows or None)}."""
  flops_row, w_bytes = 6 * d * f, 3 * d * f * itemsize
  c = tile_rows(n, k, e)
  used = e * (1.0 - (1.0 - min(1.0, k / e)) ** n)
  if backend == "gpu":
    g = _GPU
    dense = (n * e * flops_row / g["flops"] + e * w_bytes / g["bytes_per_s"]
             + n * e * (2 * f + d) * itemsize / g["bytes_per_s"] + 6 * g["launch_s"])
    tiles = max_tiles(n, k, e, c)
    bucketed = (tiles * c * flops_row / g["flops"]
                + (e + 2 * tiles) * w_bytes / g["bytes_per_s"]  # read, gathered copy, reread
                + tiles * c * (2 * f + 2 * d) * itemsize / g["bytes_per_s"] + 20 * g["launch_s"])
    return {"dense": (dense, None), "bucketed": (bucketed, c)}
  p = _CPU
  tile = (p["tile_base_s"] + expected_tiles(n, k, e, c)
          * (p["tile_step_s"] + c * flops_row / p["tile_flops"])
          + used * w_bytes / p["weight_bytes_per_s"])
  dense = (p["dense_base_s"] + n * e * flops_row / p["dense_flops"]
           + e * w_bytes / p["weight_bytes_per_s"] + n * e * (2 * f + d) * 4 / p["act_bytes_per_s"])
  return {"dense": (dense, None), "tile_loop": (tile, c)}


def choose_experts(n: int, k: int, e: int, d: int, f: int, itemsize: int = 4,
                   backend: str | None = None) -> tuple[str, int | None]:
  """What `moe_impl="auto_local"` runs for `n` tokens, top-`k` of `e` experts of width `d` x `f`
  on `backend` (default: JAX's default backend): ("ragged", None) on TPU (the grouped matmul);
  elsewhere the cheapest of `expert_costs`, as (name, tile rows or None)."""
  return _choose(n, k, e, d, f, itemsize, backend or jax.default_backend())


@functools.lru_cache(maxsize=None)
def _choose(n, k, e, d, f, itemsize, backend) -> tuple[str, int | None]:
  if backend == "tpu":
    return "ragged", None
  costs = expert_costs(n, k, e, d, f, itemsize, "gpu" if backend in ("gpu", "cuda", "rocm")
                       else "cpu")
  name = min(costs, key=lambda kk: costs[kk][0])
  return name, costs[name][1]


def experts_auto(x: jax.Array, idx: jax.Array, gate, up, down, *, layer=None) -> jax.Array:
  """`moe_impl="auto_local"`: the dropless implementation `choose_experts` picks for the static
  shapes (trace time), so a decode window and a prefill of the same model may differ. `layer`:
  stacked weights, as `experts_tile_loop` (other choices slice the layer out first)."""
  n, k = idx.shape
  e, d, f = gate.shape[-3:]
  name, c = choose_experts(n, k, e, d, f, jnp.dtype(gate.dtype).itemsize)
  if name in IN_PLACE_EXPERTS:
    return EXPERT_IMPLS[name](x, idx, gate, up, down, tile=c, layer=layer)
  weights = _layer_of((gate, up, down), layer)
  if c is not None:
    return EXPERT_IMPLS[name](x, idx, *weights, tile=c)
  return EXPERT_IMPLS[name](x, idx, *weights)


# impl(x [N, D], idx [N, K], gate [E, D, F], up [E, D, F], down [E, F, D]) -> [N, K, D]
EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense, "tile_loop": experts_tile_loop,
                "bucketed": experts_bucketed, "auto_local": experts_auto}

# Implementations that take `layer=` and stacked `[L, E, ...]` weights (read in place).
IN_PLACE_EXPERTS = {"tile_loop", "auto_local"}

# Implementations that also weight and sum the K expert outputs of each token (expert
# parallelism: the tokens travel to their experts and come back combined):
# impl(x [N, D], idx [N, K], w [N, K] float32, gate, up, down) -> (y [N, D] float32, stats)
# where stats is a dict of arrays (at least "tokens_per_expert" [E] and "dropped" []).
COMBINED_EXPERT_IMPLS = {}
# Implementations living in other packages, imported (and registered) on first use.
_LAZY_EXPERTS = {"ep": "llada_jax.parallel.expert_parallel",
                 "ep_ragged": "llada_jax.parallel.expert_parallel",
                 "ep_einsum": "llada_jax.parallel.expert_parallel"}


def register_experts(name: str, fn) -> None:
  """Makes `moe_impl=name` available (e.g. expert parallelism from `llada_jax.parallel`)."""
  EXPERT_IMPLS[name] = fn


def register_combined_experts(name: str, fn) -> None:
  """Makes `moe_impl=name` available for an implementation that also combines (see above)."""
  COMBINED_EXPERT_IMPLS[name] = fn


def expert_impl_names() -> list[str]:
  return sorted(set(EXPERT_IMPLS) | set(COMBINED_EXPERT_IMPLS) | set(_LAZY_EXPERTS))


def _load_experts(impl: str) -> None:
  if impl not in EXPERT_IMPLS and impl not in COMBINED_EXPERT_IMPLS and impl in _LAZY_EXPERTS:
    importlib.import_module(_LAZY_EXPERTS[impl])
  if impl not in EXPERT_IMPLS and impl not in COMBINED_EXPERT_IMPLS:
    raise ValueError(f"unknown moe_impl {impl!r}; choose from {expert_impl_names()}")


def moe_block(p: dict, x: jax.Array, c: ModelConfig, *, impl: str = "ragged",
              return_stats: bool = False, layer=None):
  """MoE FFN on `[B, T, D]` activations; returns (output `[B, T, D]`, router logits, idx), plus
  load-balance stats (`tokens_per_expert` [E], `dropped` []) when `return_stats`.

  `layer` (an int32 scalar, inference only): `p["experts"]` holds the stacks `[L, E, ...]` of
  every MoE layer and this is layer `layer`; implementations in `IN_PLACE_EXPERTS` read its
  experts in place, the others get the layer sliced out."""
  b, t, d = x.shape
  flat = x.reshape(b * t, d)
  logits, idx, w = route(flat, p["router"]["weight"], p["router"]["expert_bias"], c)
  ex = p["experts"]
  _load_experts(impl)
  stats = None
  weights = (ex["gate"], ex["up"], ex["down"])
  if layer is not None and impl not in IN_PLACE_EXPERTS:
    weights, layer = _layer_of(weights, layer), None
  if impl in COMBINED_EXPERT_IMPLS:
    y, stats = COMBINED_EXPERT_IMPLS[impl](flat, idx, w, *weights)
    y = y.astype(x.dtype)
  else:
    kw = {} if layer is None else {"layer": layer}
    outs = EXPERT_IMPLS[impl](flat, idx, *weights, **kw)
    y = jnp.einsum("nkd,nk->nd", outs.astype(jnp.float32), w).astype(x.dtype)
  if "shared" in p:
    s = p["shared"]
    y = y + swiglu(flat, s["gate"], s["up"], s["down"])
  out = (y.reshape(b, t, d), logits.reshape(b, t, -1), idx.reshape(b, t, -1))
  if not return_stats:
    return out
  if stats is None:  # a local implementation: every copy is computed
    stats = {"tokens_per_expert": jnp.bincount(idx.reshape(-1), length=c.num_experts),
             "dropped": jnp.zeros((), jnp.int32)}
  return out + (stats,)
