"""Logical-axis sharding rules: every parameter, optimizer-state leaf and activation -> a
PartitionSpec.

Params carry logical axis names (`llada_jax.model.params.logical_axes`); activations use the names
in `ACTIVATION_AXES`. A rule maps a logical name to a tuple of mesh axes. `logical_to_spec` turns
(names, shape) into a `PartitionSpec`, keeping a mesh axis for a dimension only when

  * the axis has size > 1 (size-1 axes are left out: same layout, shorter specs),
  * the axis is not already used by an earlier dimension of the same array, and
  * the dimension stays divisible by the product of the axes kept so far,

so any rule set gives a valid layout for any shape (e.g. 4 KV heads on `tensor=8` stay
replicated rather than failing). Optimizer state is sharded like the params it mirrors.

Default layout (FSDP + expert + tensor parallelism):
  batch -> (data, fsdp, expert); hidden dim of weights (`embed`) -> fsdp; experts -> expert;
  vocab -> (tensor, expert); attention heads / MLP widths / expert MLP widths -> tensor; layers,
  head_dim, the router and activations' hidden dim -> replicated.

The vocabulary also splits over `expert`: the embedding and LM head are the largest dense
weights (2 x 0.64 GB in bf16 for LLaDA2.1-mini), and an expert-parallel decode mesh would
otherwise hold a whole copy of both on every device (the logits of a decode window are
vocab-sharded the same way; their rows, when the batch is too small to split, stay whole).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llada_jax.config import ModelConfig
from llada_jax.model import params as params_lib
from llada_jax.parallel.mesh import mesh_shape

Rules = tuple[tuple[str, tuple[str, ...]], ...]  # hashable: sorted (logical name, mesh axes)

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "act_embed": (),
    "act_vocab": ("tensor", "expert"),
    "kv_length": (),
    "kv_heads": ("tensor",),
    # params (names from llada_jax.model.params)
    "layers": (),
    "embed": ("fsdp",),
    "vocab": ("tensor", "expert"),
    "qkv": ("tensor",),
    "heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "router": (),
    "expert": ("expert",),
    "expert_mlp": ("tensor",),
}

# Logical axes of the activations that cross a jit boundary (inputs, outputs, the KV cache).
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "length"),  # input ids, positions, canvas  [B, T]
    "rows": ("batch",),  # per-row scalars  [B]
    "hidden": ("batch", "length", "act_embed"),  # residual stream  [B, T, D]
    "logits": ("batch", "length", "act_vocab"),  # [B, T, V]
    "kv_cache": ("layers", "batch", "kv_heads", "kv_length", "head_dim"),  # [L, B, KV, S, d]
}


def _axes(v) -> tuple[str, ...]:
  if v is None:
    return ()
  if isinstance(v, str):
    return tuple(a.strip() for a in v.split(",") if a.strip())
  return tuple(v)


def normalize_rules(*layers) -> Rules:
  """`DEFAULT_RULES` with each layer's rules applied on top, in order. A layer is None, a
  mapping / ConfigDict (values: axis name, comma-separated names, list or None), pairs, or
  already-normalized `Rules`."""
  merged = dict(DEFAULT_RULES)
  for rules in layers:
    if rules is None:
      continue
    if isinstance(rules, ml_collections.ConfigDict):
      rules = {k: rules[k] for k in rules.keys()}
    items = rules.items() if isinstance(rules, Mapping) else rules
    merged.update({k: _axes(v) for k, v in items})
  return tuple(sorted(merged.items()))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=None) -> P:
  """PartitionSpec for an array of `shape` whose dims have logical `names` (see module doc).

  `mesh` is a Mesh, an AbstractMesh or a `{axis: size}` mapping; `rules` anything
  `normalize_rules` takes (or already-normalized `Rules`).
  """
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{len(shape)} shape")
  sizes = dict(mesh) if isinstance(mesh, Mapping) else mesh_shape(mesh)
  table = dict(rules if _is_normalized(rules) else normalize_rules(rules))
  used: set[str] = set()
  entries = []
  for name, dim in zip(names, shape):
    if name is not None and name not in table:
      raise ValueError(f"no sharding rule for logical axis {name!r}")
    chosen: list[str] = []
    prod = 1
    for a in table.get(name, ()) if name is not None else ():
      if a not in sizes:
        raise ValueError(f"rule {name!r} -> {a!r}: the mesh has no axis {a!r}")
      s = sizes[a]
      if s == 1 or a in used or dim % (prod * s):
        continue
      chosen.append(a)
      prod *= s
    used.update(chosen)
    entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _is_normalized(rules) -> bool:
  return isinstance(rules, tuple) and all(
      isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], tuple) for r in rules)


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_count(spec: P, mesh) -> int:
  """How many distinct pieces an array with `spec` is cut into."""
  sizes = dict(mesh) if isinstance(mesh, Mapping) else mesh_shape(mesh)
  return math.prod(sizes[a] for e in spec for a in spec_axes(e))


# ---- params and optimizer state -----------------------------------------------------------------
def param_partition_specs(config: ModelConfig, mesh, rules=None) -> Any:
  """Pytree (like the params) of PartitionSpecs."""
  rules = normalize_rules(rules) if not _is_normalized(rules) else rules
  shapes = params_lib.param_shapes(config)
  axes = params_lib.logical_axes(config)
  return jax.tree_util.tree_map(
      lambda s, names: logical_to_spec(names, s.shape, mesh, rules), shapes, axes,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def param_shardings(config: ModelConfig, mesh, rules=None) -> Any:
  """Pytree (like the params) of NamedShardings on `mesh` (concrete or abstract)."""
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                param_partition_specs(config, mesh, rules),
                                is_leaf=lambda x: isinstance(x, P))


def sharded_param_shapes(config: ModelConfig, mesh, rules=None) -> Any:
  """`param_shapes` with each ShapeDtypeStruct carrying its NamedSharding (for lowering)."""
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      params_lib.param_shapes(config), param_shardings(config, mesh, rules))


def put(tree: Any, shardings: Any) -> Any:
  """Places host or device arrays with `shardings` (same structure). Works multi-process:
  every process passes the full value and keeps only its addressable shards."""
  def one(x, sharding):
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree_util.tree_map(one, tree, shardings)


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly sharded, multi-process) arrays, whole on every process: the
  inverse of `put` (a process holding only its shards gathers the others')."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree_util.tree_map(one, tree)


def shard_params(params: Any, config: ModelConfig, mesh, rules=None) -> Any:
  """The params placed on `mesh` by the rules."""
  return put(params, param_shardings(config, mesh, rules))


def opt_state_shardings(opt_state: Any, params_shardings: Any, mesh) -> Any:
  """Shardings for an optimizer state: every sub-tree shaped like the params (Adam's mu/nu,
  momentum, ...) takes the params' shardings; every other leaf (step counts) is replicated.

  `opt_state` may hold arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape(opt.init, ...)`).
  """
  param_def = jax.tree_util.tree_structure(params_shardings)
  rep = NamedSharding(mesh, P())

  def walk(node):
    if jax.tree_util.tree_structure(node) == param_def:
      return params_shardings
    if node is None:
      return None
    if hasattr(node, "shape") and hasattr(node, "dtype"):
      return rep
    # One level down (the children themselves are kept whole as "leaves").
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    return jax.tree_util.tree_unflatten(treedef, [walk(c) for c in children])

  return walk(opt_state)


# ---- activations --------------------------------------------------------------------------------
def activation_spec(kind: str, shape: Sequence[int], mesh, rules=None) -> P:
  """PartitionSpec of an activation of `kind` (a key of `ACTIVATION_AXES`)."""
  if kind not in ACTIVATION_AXES:
    raise ValueError(f"unknown activation kind {kind!r}; choose from {sorted(ACTIVATION_AXES)}")
  return logical_to_spec(ACTIVATION_AXES[kind], shape, mesh, rules)


def activation_sharding(kind: str, shape: Sequence[int], mesh, rules=None) -> NamedSharding:
  return NamedSharding(mesh, activation_spec(kind, shape, mesh, rules))


def kv_cache_shardings(cache_shapes: Any, mesh, rules=None) -> Any:
  """Shardings for a KV cache pytree (`llada_jax.model.kv_cache`), leaves `[L, B, KV, S, d]`."""
  return jax.tree_util.tree_map(
      lambda x: activation_sharding("kv_cache", x.shape, mesh, rules), cache_shapes)


# ---- bytes --------------------------------------------------------------------------------------
def per_device_bytes(shapes: Any, specs: Any, mesh) -> int:
  """Bytes one device holds of a pytree of shapes (ShapeDtypeStruct or arrays) sharded by
  `specs` (same structure, PartitionSpecs). Exact: every kept axis divides its dimension."""
  leaves = jax.tree_util.tree_leaves(shapes)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize // shard_count(sp, mesh)
                 for s, sp in zip(leaves, spec_leaves, strict=True)))


def param_bytes_per_device(config: ModelConfig, mesh, rules=None) -> int:
  return per_device_bytes(params_lib.param_shapes(config),
                          param_partition_specs(config, mesh, rules), mesh)
