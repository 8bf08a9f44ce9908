"""Per-device memory plan of a model on a TPU mesh: params, gradients, optimizer state,
activations (with / without per-layer rematerialisation), logits and the decode KV cache, and
whether it fits v5e (16 GiB), v6e (32 GiB) and v5p (95 GiB) HBM.

  python tools/plan_memory.py --config llada2_1_flash --mesh fsdp=4,expert=16,tensor=4 \
      [--batch 8 --seq 4096] [--prompt 256 --gen 256] [--opt-dtype float32] [--flash-attention]

  python tools/plan_memory.py --train-config configs/flash_sft_edit.py [--mesh ...] \
      [--devices 256]

Params/grads/optimizer state are exact for the sharding rules; activations are an estimate
(see `llada_jax.parallel.memory`). "fits" keeps 10% of HBM free. `--train-config` plans a
training run as the trainer runs it (`llada_jax.train.plan`: its train state, mesh, micro-batch,
2L layout, remat; the attention a TPU would run).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from llada_jax import parallel  # noqa: E402
from llada_jax.config import ModelConfig, get_preset  # noqa: E402
from llada_jax.parallel import memory  # noqa: E402

GiB = memory.GiB


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--config", default="llada2_1_flash", help="preset name or config.json path")
  p.add_argument("--train-config", default=None,
                 help="a training config file (configs/*.py): plan that run (its mesh unless "
                      "--mesh; --devices for a -1 axis)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a training config key, e.g. --set grad_accum_steps=32")
  p.add_argument("--mesh", default=None, help="e.g. fsdp=4,expert=16,tensor=4")
  p.add_argument("--parallel-config", default=None,
                 help="ml_collections parallel config file (configs/mesh_*.py): mesh, rules, "
                      "MoE dispatch and capacity factor; the flags override it")
  p.add_argument("--devices", type=int, default=None, help="needed when an axis is -1")
  p.add_argument("--batch", type=int, default=8, help="global batch (train and decode)")
  p.add_argument("--seq", type=int, default=4096, help="training sequence length")
  p.add_argument("--prompt", type=int, default=256, help="decode prompt length")
  p.add_argument("--gen", type=int, default=256, help="decode generation length")
  p.add_argument("--block-length", type=int, default=32)
  p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                 help="override the config's param/compute dtype")
  p.add_argument("--opt-dtype", default="float32", help="AdamW moment dtype")
  p.add_argument("--master-fp32", action="store_true",
                 help="count an fp32 master copy of bf16 params")
  p.add_argument("--flash-attention", action="store_true",
                 help="attention kernel that keeps no [T, T] scores")
  p.add_argument("--dispatch", default=None, choices=["ragged", "dense"],
                 help="expert-parallel path whose buffers are counted (default ragged)")
  p.add_argument("--capacity-factor", type=float, default=None,
                 help="expert-parallel capacity factor (0 = worst-case buffers, dropless)")
  p.add_argument("--rule", action="append", default=[],
                 help="override a sharding rule, e.g. --rule embed=fsdp,data (repeatable)")
  return p


def gib(b: float) -> str:
  return f"{b / GiB:9.2f} GiB"


def table(c: ModelConfig, mesh, w: memory.Workload, rules=None) -> str:
  r = memory.plan(c, mesh, w, rules)
  sizes = parallel.mesh_shape(mesh)
  opt_name = f"optimizer ({w.optimizer_states} x {w.optimizer_dtype}" + (
      " + fp32 master)" if w.master_fp32 and c.param_dtype != "float32" else ")")
  attn = "flash" if w.flash_attention else "XLA attention, fp32 [T,T] scores"
  rows = [
      ("params", r["params"]), ("grads", r["grads"]), (opt_name, r["optimizer"]),
      (f"activations, remat ({attn})", r["activations_remat"]),
      (f"activations, no remat ({attn})", r["activations_no_remat"]),
      ("logits (fp32, log-softmax, grad)", r["logits"]),
      (f"KV cache (decode, canvas of prompt {w.prompt} + gen {w.gen})", r["kv_cache"]),
      ("decode activations (one window forward)", r["decode_activations"]),
  ]
  totals = [("train, remat", r["train_remat"]), ("train, no remat", r["train_no_remat"]),
            ("inference (decode)", r["inference"])]
  hbm = list(memory.HBM.items())
  width = max(len(n) for n, _ in rows + totals) + 2
  out = [f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts, "
         f"{c.param_dtype}; mesh {parallel.format_mesh_shape(sizes)} "
         f"({mesh.size} devices); batch {w.batch}, train seq "
         f"{w.seq}; MoE dispatch {w.dispatch}",
         f"{'per device':{width}s}{'bytes':>13s}"]
  out += [f"{n:{width}s}{gib(b)}" for n, b in rows]
  out.append("-" * (width + 13) + "".join(f"  {k} {v // GiB} GiB" for k, v in hbm))
  for n, b in totals:
    verdict = "".join(
        f"  {'fits' if memory.fits(b, v) else 'NO':>{len(f'{k} {v // GiB} GiB')}s}"
        for k, v in hbm)
    out.append(f"{n:{width}s}{gib(b)}{verdict}")
  return "\n".join(out)


def load_train_config(path: str, overrides=()):
  """`get_config()` of a training config file, with `KEY=VALUE` overrides (Python literals)."""
  import ast  # noqa: PLC0415
  import importlib.util  # noqa: PLC0415
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no training config file {path}")
  spec = importlib.util.spec_from_file_location("train_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node, *path = cfg, *key.split(".")
    for part in path[:-1]:
      node = node[part]
    if path[-1] not in node:
      raise ValueError(f"--set {key}: no such key in the training config")
    node[path[-1]] = value
  return cfg


def train_table(cfg, mesh_spec, devices) -> str:
  """The plan of a training run, per device, and where it fits."""
  from llada_jax.train import plan as plan_lib  # noqa: PLC0415
  from llada_jax.train import trainer  # noqa: PLC0415
  mesh = plan_lib.abstract_mesh(mesh_spec or cfg.mesh, devices)
  p = plan_lib.plan_train(cfg, mesh, backend="tpu")
  w = plan_lib.workload(cfg, "tpu")
  c = trainer.model_config(cfg)
  accum = cfg.get("grad_accum_steps", 1)
  out = [f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts; "
         f"masters {cfg.param_dtype}, compute {cfg.dtype}; mesh "
         f"{parallel.format_mesh_shape(dict(mesh.shape))} ({mesh.size} devices); global batch "
         f"{cfg.data.batch_size} x {cfg.data.seq_len} in {accum} micro-batch(es); forward of "
         f"{w.batch} rows x {w.seq * w.copies} tokens ({'2L' if w.copies == 2 else '1L'}); "
         f"remat {bool(cfg.objective.remat)}; {'flash' if w.flash_attention else 'XLA'} attention"]
  width = 34
  names = dict(params="params (masters)", opt_state="optimizer state", grads="gradients"
               + (" + accumulator" if accum > 1 else ""), activations="activations",
               logits="logits (fp32, log-softmax, grad)", total="total")
  out.append(f"{'per device':{width}s}{'bytes':>13s}")
  for k, name in names.items():
    out.append(f"{name:{width}s}{gib(p[k])}")
  out.append("fits: " + ", ".join(f"{k} {v // GiB} GiB: {'yes' if memory.fits(p['total'], v) else 'NO'}"
                                   for k, v in memory.HBM.items()))
  return "\n".join(out)


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  try:
    if a.train_config:
      print(train_table(load_train_config(a.train_config, a.set), a.mesh, a.devices))
      return 0
    c = ModelConfig.from_json_file(a.config) if os.path.exists(a.config) else get_preset(a.config)
    if a.dtype:
      c = c.replace(param_dtype=a.dtype, dtype=a.dtype)
    import export_tpu  # noqa: PLC0415 (same directory)
    mesh, rules, ep = export_tpu.mesh_and_rules(a)
    if a.dispatch is None:
      a.dispatch = ep.dispatch if ep is not None else "ragged"
    if a.capacity_factor is None:
      a.capacity_factor = ep.capacity_factor if ep is not None else 0.0
    w = memory.Workload(batch=a.batch, seq=a.seq, prompt=a.prompt, gen=a.gen,
                        block_length=a.block_length, optimizer_dtype=a.opt_dtype,
                        master_fp32=a.master_fp32, flash_attention=a.flash_attention,
                        dispatch=a.dispatch, capacity_factor=a.capacity_factor)
    print(table(c, mesh, w, rules))
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
