"""The per-device memory plan of a training run, from its config: what the trainer keeps.

`plan_train(cfg, mesh)` takes a training config (`configs/*.py`) and a mesh (a spec, sizes or a
mesh; default `cfg.mesh`) and returns bytes per device:

  * `params`, `opt_state`: the real train state (`jax.eval_shape` of the optimizer the trainer
    builds, on the master params in `param_dtype`), sharded as the trainer shards it;
  * `grads`: one gradient of the params (in `param_dtype`), plus the accumulator of the
    micro-batch scan with `grad_accum_steps` > 1;
  * `activations`, `logits`: `llada_jax.parallel.memory.plan` at the objective's real layout:
    one micro-batch (`data.batch_size / grad_accum_steps` rows), the 2L `[x_t ; x_0]` sequence
    when some block is smaller than `data.seq_len` (WSD stages included), logits on the noisy
    half, with or without `objective.remat`, a flash attention when `attention_impl` resolves
    to the Pallas kernel;
  * `total` and the HBM of TPU generations it fits (10% headroom).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from llada_jax import parallel
from llada_jax.model.transformer import resolve_attention
from llada_jax.parallel import memory
from llada_jax.train import sharding, trainer


def abstract_mesh(mesh, devices: int | None = None):
  """`mesh` (a Mesh, an AbstractMesh, a spec or axis sizes; empty: one device) as a mesh to
  plan on (a spec with a -1 axis needs `devices`)."""
  if isinstance(mesh, (jax.sharding.Mesh, AbstractMesh)):
    return mesh
  if isinstance(mesh, dict):
    mesh = ",".join(f"{k}={v}" for k, v in mesh.items())
  return parallel.make_abstract_mesh(mesh or "data=1", devices)


def _bytes_per_device(tree) -> int:
  """Bytes per device of ShapeDtypeStructs carrying shardings."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def workload(cfg, backend: str | None = None) -> memory.Workload:
  """The objective's per-step token layout as a `memory.Workload` (one micro-batch; rows
  doubled by complementary masks). `backend` ("tpu", "cpu", ...; default this host's) decides
  what `attention_impl="auto"` is: the flash-style Pallas kernel on TPU."""
  seq = cfg.data.seq_len
  blocks = [b for _, b in trainer.block_stages(cfg)]
  two_l = cfg.stage in ("bdlm", "dpo", "ebpo") and min(blocks) < seq
  impl = cfg.objective.attention_impl
  if impl == "auto":
    impl = "pallas_tpu" if (backend or jax.default_backend()) == "tpu" else "xla"
  rows = cfg.data.batch_size // max(cfg.get("grad_accum_steps", 1), 1)
  rows *= 2 if cfg.objective.get("complementary", False) else 1
  return memory.Workload(batch=rows, seq=seq, block_length=min(blocks),
                         copies=2 if two_l else 1,
                         flash_attention=resolve_attention(impl).startswith("pallas"))


def plan_train(cfg, mesh=None, *, devices: int | None = None,
               backend: str | None = None) -> dict[str, float]:
  """Bytes per device of the training run `cfg` on `mesh` (default `cfg.mesh`; a spec with -1
  needs `devices`) on `backend` (default this host's). See the module doc for the keys."""
  c = trainer.model_config(cfg)
  mesh = abstract_mesh(cfg.get("mesh") if mesh is None else mesh, devices)
  rules = parallel.normalize_rules(cfg.get("rules") or None)
  tp = sharding.TrainParallel(mesh=mesh, rules=rules, moe_impl="ragged",
                              attention_impl=cfg.objective.attention_impl,
                              remat=bool(cfg.objective.remat))
  abstract, _ = sharding.state_shardings(tp, c, trainer.make_optimizer(cfg))
  params = _bytes_per_device(abstract["params"])
  opt_state = _bytes_per_device(abstract["opt_state"])
  accum = cfg.get("grad_accum_steps", 1)
  grads = params * (2 if accum > 1 else 1)
  w = workload(cfg, backend)
  act = memory.plan(c, dict(mesh.shape), w, rules)
  activations = act["activations_remat" if cfg.objective.remat else "activations_no_remat"]
  out = dict(params=params, opt_state=opt_state, grads=grads, activations=activations,
             logits=act["logits"])
  out["total"] = sum(out.values())
  return out


def fits_on(total: float) -> dict[str, bool]:
  """Whether `total` bytes per device fit each TPU generation's HBM (10% headroom)."""
  return {name: memory.fits(total, hbm) for name, hbm in memory.HBM.items()}
