"""The trainer's parallel setup: one mesh, one set of logical-axis rules and one MoE / attention
implementation for every objective, the sharded train state, and the global batch assembled from
per-process pieces.

`cfg.mesh` is a spec string ("data=2,expert=4"; "" = one device). The train state
`{"params", "opt_state", "step"}` is created directly in its shardings (params by the rules,
optimizer moments like the params they mirror, counters replicated). A batch of `B` rows is split
over the batch axes (`data`, `fsdp`, `expert` by default); each process feeds only the rows its
devices hold (`process_rows`), read from `data_shards` fixed slices of the global batch, so the
global batch does not depend on how many processes read it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llada_jax import parallel
from llada_jax.config import ModelConfig
from llada_jax.model import params as params_lib
from llada_jax.parallel import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class TrainParallel:
  """Where and how every jitted training computation runs (hashable parts only are static)."""

  mesh: Mesh
  rules: rules_lib.Rules
  moe_impl: str  # resolved: "ragged", "dense", or a registered expert-parallel name
  attention_impl: str
  remat: bool

  @property
  def shape(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def rows(self, shape) -> NamedSharding:
    """Sharding of a per-row array `[B, ...]`: rows over the batch axes, the rest whole."""
    spec = rules_lib.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, self.mesh,
                                     self.rules)
    return NamedSharding(self.mesh, spec)


def build_mesh(spec) -> Mesh:
  """`cfg.mesh` as a Mesh: "" / None is the first device alone; a spec covers every device."""
  if not spec:
    if jax.process_count() > 1:
      raise ValueError("training on more than one process needs a mesh "
                       "(--config.mesh, e.g. data=-1)")
    return parallel.make_mesh(None, devices=jax.devices()[:1])
  return parallel.make_mesh(spec)


def resolve_moe(name: str, mesh: Mesh, rules) -> str:
  """`objective.moe_impl` under `mesh`, by `llada_jax.parallel.sharded.resolve_moe_impl` (the
  same choice as decoding): "auto" is the dropless expert-parallel path when the mesh has an
  expert axis ("ep_ragged" on TPU, "ep_einsum" elsewhere), else the backend's local one ("ragged" on
  TPU, "auto_local" elsewhere); expert-parallel names follow the rules."""
  from llada_jax.parallel.sharded import resolve_moe_impl  # noqa: PLC0415
  has_experts = dict(mesh.shape).get("expert", 1) > 1
  return resolve_moe_impl(name, mesh if has_experts else None, rules=rules)


def setup(cfg) -> TrainParallel:
  """The run's `TrainParallel` from the training config (mesh, rules, objective impls)."""
  mesh = build_mesh(cfg.mesh)
  rules = rules_lib.normalize_rules(cfg.get("rules") or None)
  o = cfg.objective
  return TrainParallel(mesh=mesh, rules=rules, moe_impl=resolve_moe(o.moe_impl, mesh, rules),
                       attention_impl=o.attention_impl, remat=bool(o.remat))


# ---- the train state ----------------------------------------------------------------------------
def state_shardings(tp: TrainParallel, c: ModelConfig, optimizer) -> tuple[Any, Any]:
  """(abstract state with shardings, shardings) for `{"params", "opt_state", "step"}`."""
  ps = parallel.param_shardings(c, tp.mesh, tp.rules)
  shapes = params_lib.param_shapes(c)
  opt_shapes = jax.eval_shape(optimizer.init, shapes)
  shardings = dict(params=ps, opt_state=parallel.opt_state_shardings(opt_shapes, ps, tp.mesh),
                   step=tp.replicated())
  abstract = dict(params=shapes, opt_state=opt_shapes,
                  step=jax.ShapeDtypeStruct((), jnp.int32))
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
  return abstract, shardings


def init_state(tp: TrainParallel, c: ModelConfig, optimizer, seed: int, shardings):
  """A fresh random train state, each leaf created in its sharding (no full copy anywhere)."""
  def init(key):
    params = params_lib.init_params(c, key)
    return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
  with jax.set_mesh(tp.mesh):
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def state_from_params(tp: TrainParallel, params, optimizer, shardings):
  """The train state around given params (placed by the rules first)."""
  params = parallel.put(params, shardings["params"])
  def init(p):
    return dict(params=p, opt_state=optimizer.init(p), step=jnp.zeros((), jnp.int32))
  with jax.set_mesh(tp.mesh):
    return jax.jit(init, in_shardings=(shardings["params"],), out_shardings=shardings,
                   donate_argnums=(0,))(params)


def device_bytes(tree) -> dict[str, int]:
  """Bytes of `tree`'s arrays: `total` (logical, unsharded) and `per_device` (the most any one
  local device holds)."""
  per: dict[Any, int] = {}
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    total += leaf.size * leaf.dtype.itemsize
    for shard in leaf.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.size * leaf.dtype.itemsize
  return dict(total=int(total), per_device=int(max(per.values(), default=0)))


# ---- the global batch ---------------------------------------------------------------------------
def process_rows(sharding: NamedSharding, shape) -> np.ndarray:
  """Sorted global row indices of `[B, ...]` that this process's devices hold."""
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    sl = index[0] if index else slice(None)
    rows.update(range(*sl.indices(shape[0])))
  return np.array(sorted(rows), np.int64)


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """How the global batch of `batch_size` rows is read: `num_shards` fixed slices of
  `rows_per_shard` rows (shard k = rows [k r, (k+1) r), read from the k-th shard of the data),
  of which this process reads `local_shards` (in order: its local rows)."""

  batch_size: int
  num_shards: int
  local_shards: tuple[int, ...]

  @property
  def rows_per_shard(self) -> int:
    return self.batch_size // self.num_shards

  @property
  def local_rows(self) -> np.ndarray:
    r = self.rows_per_shard
    return np.concatenate([np.arange(k * r, (k + 1) * r) for k in self.local_shards])


def data_layout(tp: TrainParallel, batch_size: int, seq_len: int, num_shards: int = 0
                ) -> DataLayout:
  """The `DataLayout` of a `[batch_size, seq_len]` batch on this process.

  `num_shards=0` picks one shard per process row group (1 on one process); any other value fixes
  the layout, so runs with different process counts read the same global batches.
  """
  rows = process_rows(tp.rows((batch_size, seq_len)), (batch_size, seq_len))
  if not num_shards:
    num_shards = batch_size // len(rows)
  if batch_size % num_shards:
    raise ValueError(f"data.shards={num_shards} does not divide the batch size {batch_size}")
  r = batch_size // num_shards
  local = tuple(sorted({int(i) // r for i in rows}))
  layout = DataLayout(batch_size, num_shards, local)
  if not np.array_equal(layout.local_rows, rows):
    raise ValueError(
        f"this process holds rows {rows.tolist()} of the batch, not whole data shards of {r} "
        f"rows (data.shards={num_shards}); choose data.shards so that every process reads "
        "whole shards")
  return layout


def global_batch(tp: TrainParallel, local: dict, batch_size: int) -> dict:
  """Global arrays `[batch_size, ...]` split over the batch axes, from this process's rows
  (`local`, numpy, in `process_rows` order)."""
  def one(x):
    x = np.asarray(x)
    shape = (batch_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(tp.rows(shape), x, shape)
  return {k: one(v) for k, v in local.items()}


def put_rows(tp: TrainParallel, tree):
  """Host arrays that every process holds whole (e.g. toy-task batches, EBPO advantages),
  placed with their rows over the batch axes."""
  return jax.tree_util.tree_map(lambda x: parallel.put(np.asarray(x), tp.rows(np.shape(x))),
                                tree)


# ---- multi-process helpers ----------------------------------------------------------------------
def allgather_json(obj) -> list:
  """`[obj of process 0, obj of process 1, ...]` of a JSON-able object, on every process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # noqa: PLC0415
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
  n = int(np.max(sizes))
  padded = np.zeros(n, np.uint8)
  padded[:data.size] = data
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(everyone[i, :int(sizes[i][0])]).decode())
          for i in range(everyone.shape[0])]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (e.g. a SIGTERM seen by one)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.max(multihost_utils.process_allgather(np.array([int(flag)], np.int32))))


def mesh_description(tp: TrainParallel) -> dict:
  return dict(mesh=parallel.format_mesh_shape(tp.shape), mesh_shape=tp.shape,
              devices=jax.device_count(), local_devices=jax.local_device_count(),
              processes=jax.process_count(), platform=jax.devices()[0].platform,
              moe_impl=tp.moe_impl, attention_impl=tp.attention_impl, remat=tp.remat,
              rules={k: list(v) for k, v in tp.rules})
