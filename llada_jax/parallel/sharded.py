"""Running the model under a mesh: what a `mesh=` argument means ("auto", a spec string, a
`Mesh`), the MoE implementation that goes with it, and placing params and inputs.

`llada_jax.forward(..., mesh=...)` and `llada_jax.generate(..., mesh=...)` call these; so do the
decode CLI (`--mesh`) and `tools/logits.py`. `mesh="auto"` picks the mesh with `auto_mesh_shape`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import jax
from jax.sharding import Mesh

from llada_jax.config import ModelConfig
from llada_jax.parallel import expert_parallel as ep_lib
from llada_jax.parallel.memory import Workload, fits, plan
from llada_jax.parallel.mesh import format_mesh_shape, make_mesh, parse_mesh_spec
from llada_jax.parallel.rules import normalize_rules

AUTO = "auto"


def _divisors_desc(n: int) -> list[int]:
  return [d for d in range(n, 0, -1) if n % d == 0]


def device_memory_bytes(device=None) -> int | None:
  """Memory of one accelerator (`bytes_limit` of its memory stats); None where unknown (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 (backends without memory stats raise various errors)
    return None
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def auto_mesh_shape(config: ModelConfig, num_devices: int, *, hbm_bytes: int | None = None,
                    workload: Workload = Workload(batch=1), rules=None) -> dict[str, int]:
  """The inference mesh `mesh="auto"` picks for `num_devices` devices of `hbm_bytes` each.

  Expert parallelism first: `expert` = the largest divisor of `num_devices` that divides the
  expert count (each device holds E / expert experts, and the MoE weights are almost all of the
  model). The remaining factor goes to `data` (the dense weights replicated: no collectives for
  them) unless the planner's inference bytes (params + KV cache + one window's activations) do
  not fit in `hbm_bytes` with 10% headroom; then it moves to `fsdp`, then to `tensor`, a factor
  at a time, and the first candidate that fits wins. With `hbm_bytes=None` (CPU) the first
  candidate wins. Raises ValueError when nothing fits.
  """
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  expert = math.gcd(num_devices, config.num_experts) if config.num_experts else 1
  rest = num_devices // expert
  candidates = []
  for tensor in _divisors_desc(rest)[::-1]:
    for fsdp in _divisors_desc(rest // tensor)[::-1]:
      data = rest // tensor // fsdp
      candidates.append(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor))
  best = None
  for shape in candidates:
    need = plan(config, shape, workload, rules)["inference"]
    if hbm_bytes is None or fits(need, hbm_bytes):
      return shape
    if best is None or need < best[1]:
      best = (shape, need)
  raise ValueError(
      f"the model does not fit on {num_devices} devices of {hbm_bytes / 2**30:.1f} GiB: the "
      f"smallest plan ({format_mesh_shape(best[0])}) needs {best[1] / 2**30:.1f} GiB per device")


def resolve_mesh(mesh, config: ModelConfig | None = None, *,
                 workload: Workload = Workload(batch=1), rules=None, devices=None) -> Mesh | None:
  """A `mesh=` argument as a `Mesh`, or None for "no mesh" (one device).

  None -> None; a `Mesh` -> itself; "auto" -> `auto_mesh_shape` over all devices (None on one
  device); a spec string such as "data=2,expert=4" -> `make_mesh(spec)`.
  """
  if mesh is None or isinstance(mesh, Mesh):
    return mesh
  devices = list(jax.devices() if devices is None else devices)
  if mesh == AUTO:
    if len(devices) == 1:
      return None
    if config is None:
      raise ValueError("mesh='auto' needs the model config")
    shape = auto_mesh_shape(config, len(devices), hbm_bytes=device_memory_bytes(devices[0]),
                            workload=workload, rules=rules)
    return make_mesh(shape, devices)
  if not isinstance(mesh, str):
    raise ValueError(f"mesh must be None, 'auto', a spec like 'data=2,expert=4' or a Mesh, "
                     f"got {mesh!r}")
  shape = parse_mesh_spec(mesh)
  need = math.prod(shape.values())
  if need < 0:  # a -1 axis takes the devices left over
    return make_mesh(shape, devices)
  if len(devices) < need:
    raise ValueError(f"mesh {mesh} needs {need} devices, have {len(devices)} (on CPU start "
                     f"with XLA_FLAGS=--xla_force_host_platform_device_count={need})")
  return make_mesh(shape, devices[:need])


def mesh_for_checkpoint(spec, checkpoint: str, *, dtype=None,
                        workload: Workload = Workload(batch=1), rules=None) -> Mesh | None:
  """`resolve_mesh(spec, ...)` with the model config read from `checkpoint/config.json` (cheap:
  no weights), for entry points that place the weights while loading them."""
  if spec is None or isinstance(spec, Mesh):
    return spec
  config = ModelConfig.from_json_file(os.path.join(checkpoint, "config.json"))
  if dtype is not None:
    name = jax.numpy.dtype(dtype).name
    config = config.replace(dtype=name, param_dtype=name)
  return resolve_mesh(spec, config, workload=workload, rules=rules)


def fake_cpu_devices(spec) -> None:
  """Before JAX starts its backends: asks for as many CPU devices as the mesh `spec` needs, so
  that a mesh spec also runs on a CPU-only host (no effect on TPU/GPU devices, nor once JAX's
  backends are up)."""
  if spec is None or isinstance(spec, Mesh) or spec == AUTO:
    return
  need = math.prod(parse_mesh_spec(spec).values())
  if need > 1:
    try:
      jax.config.update("jax_num_cpu_devices", need)
    except RuntimeError:  # backends already initialised
      pass


def mesh_context(mesh):
  """`jax.set_mesh(mesh)`, or a no-op context for `mesh=None`."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def ep_config_of(name: str) -> ep_lib.EPConfig | None:
  """The `EPConfig` a registered expert-parallel `moe_impl` name stands for (None otherwise)."""
  for cfg, registered in ep_lib._REGISTERED.items():
    if registered == name:
      return cfg
  return None


def resolve_moe_impl(moe_impl, mesh=None, rules=None, *, dropless: bool = False) -> str:
  """A `moe_impl` name for running under `mesh` (None: one device).

  "auto": without a mesh "ragged" (`lax.ragged_dot`) on TPU and "auto_local" elsewhere (dense
  or sorted tiles, chosen per static shape: `llada_jax.model.moe.choose_experts`); with one the
  dropless expert-parallel path, "ep_ragged" (ragged_all_to_all) on TPU and "ep_einsum" (dense
  all_to_all at worst-case capacity, a batched einsum over the buffer) elsewhere. An `EPConfig` is registered; the built-in "ep"/"ep_ragged" follow `rules`
  when they differ from the defaults (so the experts' in-specs match the params).
  `dropless=True` (decoding) refuses a dispatch that can drop token copies (capacity_factor > 0):
  a dropped copy would silently change the decoded tokens."""
  name = _resolve_moe_name(moe_impl, mesh, rules)
  cfg = ep_config_of(name)
  if dropless and cfg is not None and cfg.capacity_factor:
    raise ValueError(f"decoding needs a dropless MoE dispatch, but moe_impl {name!r} has "
                     f"capacity_factor {cfg.capacity_factor} (use 0: worst-case buffers)")
  return name


def _resolve_moe_name(moe_impl, mesh, rules) -> str:
  if moe_impl == AUTO:
    if mesh is None:  # TPU: the grouped matmul; CPU/GPU: chosen per static shape (model/moe.py)
      return "ragged" if jax.default_backend() == "tpu" else "auto_local"
    moe_impl = "ep_ragged" if jax.default_backend() == "tpu" else "ep_einsum"
  if isinstance(moe_impl, ep_lib.EPConfig):
    return ep_lib.register_ep(moe_impl)
  if rules is not None and moe_impl in ep_lib._BUILTIN:
    cfg = ep_lib._BUILTIN[moe_impl]
    rules = normalize_rules(rules)
    if rules != cfg.rules:
      return ep_lib.register_ep(dataclasses.replace(cfg, rules=rules))
  return moe_impl


def sharded_forward(params, config: ModelConfig, input_ids, mesh, *, rules=None,
                    moe_impl="ep", **kw):
  """`llada_jax.forward(..., mesh=mesh)` (kept for existing callers)."""
  from llada_jax.model.transformer import forward  # noqa: PLC0415
  return forward(params, config, input_ids, mesh=mesh, rules=rules, moe_impl=moe_impl, **kw)


def sharded_generate(params, config: ModelConfig, prompts, mesh, *, rules=None, moe_impl="ep",
                     **kw):
  """`llada_jax.generate(..., mesh=mesh)` (kept for existing callers)."""
  from llada_jax.decode import generate  # noqa: PLC0415
  return generate(params, config, prompts, mesh=mesh, rules=rules, moe_impl=moe_impl, **kw)
