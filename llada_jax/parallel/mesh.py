"""Named device meshes: the four axes `data`, `fsdp`, `expert`, `tensor`, from a spec string or an
ml_collections config.

A mesh spec is `"data=2,expert=4"`: named sizes, the missing axes are 1, and at most one axis may
be `-1` ("the devices left over"). Every mesh built here has all four axes (size-1 axes cost
nothing and keep the sharding rules independent of the mesh shape) and `Auto` axis types:
JAX 0.10's `jax.make_mesh` defaults to `Explicit` axes, which would make sharding part of every
array's type; the model relies on GSPMD propagation instead, with `shard_map` only around the MoE.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Mapping, Sequence

import jax
import ml_collections
from jax.sharding import AbstractMesh, AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh_spec(spec) -> dict[str, int]:
  """`"data=2,expert=4"` (or a mapping) -> `{"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}`.

  Sizes are positive integers, or -1 for at most one axis (resolved by `resolve_mesh_shape`).
  An empty spec or None is the 1-device mesh.
  """
  if spec is None:
    items: dict[str, int] = {}
  elif isinstance(spec, str):
    items = {}
    for part in (p.strip() for p in spec.split(",")):
      if not part:
        continue
      name, eq, value = part.partition("=")
      name = name.strip()
      if not eq:
        raise ValueError(f"invalid mesh spec {spec!r}: {part!r} is not NAME=SIZE")
      if name in items:
        raise ValueError(f"invalid mesh spec {spec!r}: axis {name!r} given twice")
      try:
        items[name] = int(value)
      except ValueError:
        raise ValueError(
            f"invalid mesh spec {spec!r}: size of {name!r} is not an integer") from None
  elif isinstance(spec, (Mapping, ml_collections.ConfigDict)):
    items = {str(k): spec[k] for k in spec.keys()}
  else:
    raise ValueError(f"invalid mesh spec {spec!r}: expected 'name=size,...' or a mapping")
  unknown = sorted(set(items) - set(AXES))
  if unknown:
    raise ValueError(f"invalid mesh spec {spec!r}: unknown axis {unknown[0]!r} "
                     f"(axes are {', '.join(AXES)})")
  out = {}
  for name in AXES:
    v = items.get(name, 1)
    if isinstance(v, bool) or not isinstance(v, int) or not (v >= 1 or v == -1):
      raise ValueError(f"invalid mesh spec {spec!r}: size of {name!r} must be a positive "
                       f"integer or -1, got {v!r}")
    out[name] = v
  if sum(v == -1 for v in out.values()) > 1:
    raise ValueError(f"invalid mesh spec {spec!r}: at most one axis may be -1")
  return out


def resolve_mesh_shape(spec, num_devices: int) -> dict[str, int]:
  """The parsed spec with its -1 axis filled so that the sizes multiply to `num_devices`."""
  shape = parse_mesh_spec(spec)
  known = math.prod(v for v in shape.values() if v != -1)
  if -1 in shape.values():
    if num_devices % known:
      raise ValueError(f"mesh {format_mesh_shape(shape)}: {num_devices} devices are not a "
                       f"multiple of {known}")
    shape = {k: (num_devices // known if v == -1 else v) for k, v in shape.items()}
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh {format_mesh_shape(shape)} needs {math.prod(shape.values())} "
                     f"devices, have {num_devices}")
  return shape


def format_mesh_shape(shape: Mapping[str, int]) -> str:
  """`{"data": 2, "fsdp": 1, ...}` -> `"data=2,expert=4"` (size-1 axes left out)."""
  return ",".join(f"{k}={v}" for k, v in shape.items() if v != 1) or "data=1"


def make_mesh(spec=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all of `jax.devices()`) with the axes `AXES`, all Auto."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(spec, len(devices))
  return jax.make_mesh(tuple(shape.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def make_abstract_mesh(spec, num_devices: int | None = None) -> AbstractMesh:
  """An `AbstractMesh` (no devices: for lowering/export of pod-size programs on any host)."""
  shape = parse_mesh_spec(spec)
  if num_devices is not None or -1 in shape.values():
    if num_devices is None:
      raise ValueError("a mesh spec with a -1 axis needs num_devices")
    shape = resolve_mesh_shape(shape, num_devices)
  return AbstractMesh(tuple(shape.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
  """Axis name -> size of a concrete or abstract mesh."""
  return dict(mesh.shape)


# ---- ml_collections run config ------------------------------------------------------------------
def default_parallel_config() -> ml_collections.ConfigDict:
  """The per-run parallelism config: mesh shape, logical-axis rules and the MoE dispatch.

  Fields:
    mesh: sizes of data / fsdp / expert / tensor (one may be -1: "the rest of the devices").
    rules: logical axis name -> comma-separated mesh axis names ("" = replicated), e.g.
      `rules.batch = "data,fsdp,expert"`; see `llada_jax.parallel.rules.DEFAULT_RULES`.
    moe: expert parallelism (`llada_jax.parallel.expert_parallel.EPConfig`): `dispatch` "dense"
      (capacity all_to_all, runs everywhere) or "ragged" (ragged_all_to_all, TPU);
      `capacity_factor` (dense; 0 = worst case, dropless); `gmm` "ragged_dot" | "einsum" |
      "megablox".
  """
  from llada_jax.parallel.rules import DEFAULT_RULES  # noqa: PLC0415 (rules imports this module)
  cfg = ml_collections.ConfigDict()
  cfg.mesh = ml_collections.ConfigDict({k: (-1 if k == "data" else 1) for k in AXES})
  cfg.rules = ml_collections.ConfigDict({k: ",".join(v) for k, v in DEFAULT_RULES.items()})
  cfg.moe = ml_collections.ConfigDict(dict(dispatch="dense", capacity_factor=0.0,
                                           gmm="ragged_dot"))
  return cfg


def parallel_config(mesh=None, **rules) -> ml_collections.ConfigDict:
  """`default_parallel_config()` with `mesh` (a spec string or mapping) and rule overrides."""
  cfg = default_parallel_config()
  if mesh is not None:
    for k, v in parse_mesh_spec(mesh).items():
      cfg.mesh[k] = v
  for k, v in rules.items():
    cfg.rules[k] = v if isinstance(v, str) else ",".join(v or ())
  return cfg


def mesh_from_config(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  return make_mesh(dict(cfg.mesh), devices)


def load_parallel_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (e.g. `configs/mesh_flash_256.py`), checked against the
  `default_parallel_config()` fields."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no parallel config at {path}")
  spec = importlib.util.spec_from_file_location("_parallel_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  base = default_parallel_config()
  unknown = sorted(set(cfg.keys()) - set(base.keys()))
  if unknown:
    raise ValueError(f"{path}: unknown parallel config field {unknown[0]!r}")
  parse_mesh_spec(dict(cfg.mesh))
  return cfg
