"""Block-diffusion attention under a device mesh: the Pallas kernel inside `jax.shard_map`.

Mosaic kernels cannot be partitioned by GSPMD ("Mosaic kernels cannot be automatically
partitioned"), so when a mesh with more than one device is in context (`jax.set_mesh`, or
`jax.sharding.use_abstract_mesh` for export) the kernel runs inside a `shard_map` over every
non-manual axis of that mesh. Each device then runs the unsharded kernel on its piece:

  batch   q, k, v `[B, T, heads, d]` and the layout ids `[B, T]` are split over `BATCH_AXES`
          (the `batch` rule of `llada_jax.parallel.rules.DEFAULT_RULES`), greedily like the
          rules: an axis is used when the mesh has it with size > 1 and B stays divisible by
          the product of the axes kept so far; the others are replicated (every device along
          them computes the same rows).
  heads   over `HEAD_AXES` (the `heads` / `kv_heads` rule), tp devices, one of four modes:
            "kv"         KV % tp == 0: query heads and KV heads both split; a device holds
                         whole GQA groups (H/tp query heads, KV/tp KV heads);
            "group"      KV % tp != 0, H % tp == 0 and the H/tp query heads of a device lie in
                         one GQA group (G % (H/tp) == 0, e.g. KV < tp): K/V replicated, each
                         device slices its one KV head (by axis index) and runs the kernel
                         with H/tp heads sharing it;
            "gather"     KV % tp != 0, H % tp == 0 otherwise (e.g. H=6, KV=3, tp=2): K/V
                         replicated, each device gathers the KV head of each of its query
                         heads (kernel with one query head per KV head: more K/V traffic);
            "replicate"  H % tp != 0: heads are not split (tensor devices compute the same).
          With "group" / "gather" the K/V gradients of the replicated inputs are summed over
          the tensor devices by `shard_map`'s transpose.

Sequence lengths are never split (Tq and Tk whole on every device), so the same wrapper serves
the block-causal forward, a decode window against the KV cache (Tq != Tk) and the 2L training
layout. Gradients flow through `shard_map` into the kernel's `custom_vjp`.

A KV cache passed as its own operands (`cache=`: `cache_k`, `cache_v` `[L, B, KV, S, d]`, the
`cache_layout` `[B, S]` and the layer `cache_index`) is split like k, v: batch over the batch
axes, KV heads over the head axes in mode "kv", else replicated; in modes "group" / "gather"
it is not sliced per device (that would copy it): the local function receives `cache_heads`,
the cache KV head of each of its kernel KV heads, and its index map reads them in place.

This module imports nothing from the model or `llada_jax.parallel` (the kernels' rule); the
axis names mirror the default rules and can be passed explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

BATCH_AXES = ("data", "fsdp", "expert")  # = parallel.rules.DEFAULT_RULES["batch"]
HEAD_AXES = ("tensor",)  # = DEFAULT_RULES["heads"] and ["kv_heads"]
HEAD_MODES = ("none", "kv", "group", "gather", "replicate")


@dataclasses.dataclass(frozen=True)
class AttentionSharding:
  """How one attention call is split (static; see the module doc).

  batch_axes: mesh axes splitting B. head_axes: mesh axes splitting the query heads (empty for
  modes "none" and "replicate"). tp: their total size. head_mode: one of `HEAD_MODES`.
  groups: G = H // KV of the call.
  """

  batch_axes: tuple[str, ...]
  head_axes: tuple[str, ...]
  tp: int
  head_mode: str
  groups: int

  def cache_spec(self) -> P:
    """A KV cache `[L, B, KV, S, d]`: batch like k/v, KV heads split only in mode "kv"."""
    kv = _entry(self.head_axes) if self.head_mode == "kv" else None
    return P(None, _entry(self.batch_axes), kv, None, None)

  def specs(self) -> tuple[P, P, P]:
    """(q and output `[B, T, H, d]`, k/v `[B, T, KV, d]`, layout ids `[B, T]`) specs."""
    b = _entry(self.batch_axes)
    h = _entry(self.head_axes)
    kv = h if self.head_mode == "kv" else None
    return P(b, None, h, None), P(b, None, kv, None), P(b, None)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def free_axes(mesh) -> dict[str, int]:
  """Axis name -> size of the non-manual axes of `mesh` (a Mesh or AbstractMesh)."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return {a: s for a, s in mesh.shape.items() if types[a] != AxisType.Manual}


def context_mesh():
  """The mesh in context (abstract) when it has a non-manual axis of size > 1, else None
  (no mesh, a 1-device mesh, or already inside a `shard_map` over every axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(s > 1 for s in free_axes(mesh).values()):
    return None
  return mesh


def plan_sharding(sizes: dict[str, int], batch: int, heads: int, kv_heads: int,
                  batch_axes: Sequence[str] = BATCH_AXES,
                  head_axes: Sequence[str] = HEAD_AXES) -> AttentionSharding:
  """The split of a call with `batch` rows, `heads` query and `kv_heads` KV heads over the
  (non-manual) mesh axes `sizes`."""
  used: list[str] = []
  prod = 1
  for a in batch_axes:
    s = sizes.get(a, 1)
    if s > 1 and batch % (prod * s) == 0:
      used.append(a)
      prod *= s
  h_axes = tuple(a for a in head_axes if sizes.get(a, 1) > 1 and a not in used)
  tp = math.prod(sizes[a] for a in h_axes)
  g = heads // kv_heads
  if tp == 1:
    mode = "none"
  elif kv_heads % tp == 0:
    mode = "kv"
  elif heads % tp:
    mode = "replicate"
  elif g % (heads // tp) == 0:
    mode = "group"
  else:
    mode = "gather"
  if mode in ("none", "replicate"):
    h_axes, tp = (), 1
  return AttentionSharding(tuple(used), h_axes, tp, mode, g)


def _select_kv(k: jax.Array, v: jax.Array, plan: AttentionSharding, local_heads: int):
  """The KV heads this device's query heads use, from replicated k, v `[B, T, KV, d]`:
  "group" -> `[B, T, 1, d]`, "gather" -> `[B, T, local_heads, d]`."""
  first = lax.axis_index(plan.head_axes) * local_heads  # global index of the first query head
  if plan.head_mode == "group":
    start = first // plan.groups
    one = lambda x: lax.dynamic_slice_in_dim(x, start, 1, axis=2)
    return one(k), one(v)
  idx = (first + jnp.arange(local_heads)) // plan.groups
  return jnp.take(k, idx, axis=2), jnp.take(v, idx, axis=2)


def _cache_heads(plan: AttentionSharding, local_heads: int):
  """The cache KV head of each kernel KV head of this device (None: the device's own heads,
  modes "none", "kv" and "replicate"): "group" -> `[1]`, "gather" -> `[local_heads]`."""
  if plan.head_mode not in ("group", "gather"):
    return None
  first = lax.axis_index(plan.head_axes) * local_heads  # global index of the first query head
  if plan.head_mode == "group":
    return jnp.reshape(first // plan.groups, (1,)).astype(jnp.int32)
  return ((first + jnp.arange(local_heads)) // plan.groups).astype(jnp.int32)


def shard_attention(local_fn: Callable[..., jax.Array], q, k, v, q_layout, k_layout, *,
                    mesh=None, batch_axes: Sequence[str] = BATCH_AXES,
                    head_axes: Sequence[str] = HEAD_AXES, cache: dict | None = None) -> jax.Array:
  """`local_fn(q, k, v, q_layout, k_layout)` run per device inside `jax.shard_map`.

  Args:
    local_fn: an unsharded attention (q `[b, Tq, h, d]`, k/v `[b, Tk, kv, d]`, layouts
      `[b, T]`) -> `[b, Tq, h, d]`; it receives the per-device pieces.
    q: `[B, Tq, H, d]`; k, v: `[B, Tk, KV, d]`; q_layout: Layout `[B, Tq]`; k_layout `[B, Tk]`.
    mesh: the mesh to split over; None = the context mesh. Without a multi-device mesh
      `local_fn` is called directly.
    cache: None, or dict(cache_k, cache_v `[L, B, KV, S, d]`, cache_layout `[B, S]`,
      cache_index int32 scalar), passed to `local_fn` as keywords (per-device pieces) together
      with `cache_heads` (see `_cache_heads`).
  Returns: `[B, Tq, H, d]`.
  """
  mesh = context_mesh() if mesh is None else mesh
  if mesh is None:
    return local_fn(q, k, v, q_layout, k_layout, **(cache or {}))
  sizes = free_axes(mesh)
  plan = plan_sharding(sizes, q.shape[0], q.shape[2], k.shape[2], batch_axes, head_axes)
  q_spec, kv_spec, id_spec = plan.specs()
  local_heads = q.shape[2] // plan.tp

  def body(q, k, v, q_layout, k_layout, *cache_args):
    kw = {}
    if cache_args:
      ck, cv, cl, ci = cache_args
      kw = dict(cache_k=ck, cache_v=cv, cache_layout=cl, cache_index=ci,
                cache_heads=_cache_heads(plan, local_heads))
    if plan.head_mode in ("group", "gather"):
      k, v = _select_kv(k, v, plan, local_heads)
    return local_fn(q, k, v, q_layout, k_layout, **kw)

  args = (q, k, v, q_layout, k_layout)
  specs = (q_spec, kv_spec, kv_spec, id_spec, id_spec)
  if cache is not None:
    args += (cache["cache_k"], cache["cache_v"], cache["cache_layout"], cache["cache_index"])
    specs += (plan.cache_spec(), plan.cache_spec(), id_spec, P())
  if any(t == AxisType.Explicit for t in mesh.axis_types):  # shard_map wants matching types
    args = tuple(jax.tree_util.tree_map(lambda x, s=s: jax.reshard(x, s), a)
                 for a, s in zip(args, specs))
  # Manual over every free axis (unused ones replicate): a Mosaic call cannot stay auto.
  # check_vma=False: `pallas_call` outputs carry no varying-axes type (as for JAX's splash
  # kernels); the transpose then psums the cotangents of inputs replicated along an axis.
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       axis_names=frozenset(sizes), check_vma=False)(*args)
