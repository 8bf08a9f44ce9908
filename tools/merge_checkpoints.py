"""Average the params of a training run's best k checkpoints (LLaDA2.0's top-k checkpoint merge).

  python tools/merge_checkpoints.py --workdir W --k 3 [--metric eval_loss] [--out DIR] \
      [--allow-fewer]

`W` is a run directory of `python -m llada_jax.train`: orbax checkpoints in
`W/checkpoints/<step>/`, one metrics row per logged step in `W/metrics.jsonl` (held-out rows with
`eval_loss`, `eval_accuracy`, ... when the run had `eval_every > 0`), the run's config record in
`W/config.json`. Among the checkpoints on disk, the k with the lowest `--metric` recorded at
their own step are chosen (ties: the earlier step); checkpoints with no finite value at their
step are ignored, with a line saying how many. Only their params are restored (not the optimizer
state), on the host, one checkpoint at a time, and averaged leaf by leaf in float32. The mean is
written, like the trainer's `export_hf`, as an HF checkpoint in the model's compute dtype
(safetensors + config.json, plus the tokenizer files of the run's tokenizer directory when it
used one) to `--out` (default `W/merged_top{k}`), with `merge.json` (metric, steps, values). It
loads with `llada_jax.load_hf_checkpoint` and `python -m llada_jax.decode --checkpoint DIR`.

Bad input (no such run directory, no checkpoints, --k < 1, a metric the metrics file does not
record, fewer than k checkpoints with a value without --allow-fewer) is one line on stderr and
exit status 2, before any checkpoint is restored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from llada_jax.errors import InputError, run_main  # noqa: E402
from llada_jax.tokenizer import copy_tokenizer  # noqa: E402

METRICS_NAME = "metrics.jsonl"
MERGE_NAME = "merge.json"


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one `InputError` line (exit status 2 via `run_main`)."""

  def error(self, message):
    raise InputError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory of python -m llada_jax.train")
  p.add_argument("--k", type=int, required=True, help="how many checkpoints to average")
  p.add_argument("--metric", default="eval_loss",
                 help="metrics.jsonl key; the checkpoints with its lowest values are merged")
  p.add_argument("--out", default=None, help="output directory (default: W/merged_top{k})")
  p.add_argument("--allow-fewer", action="store_true",
                 help="merge the checkpoints there are when fewer than k have the metric")
  p.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
  return p


# ---- what to merge ------------------------------------------------------------------------------
@dataclasses.dataclass
class MergePlan:
  """Everything a merge needs, checked before any checkpoint is read."""

  workdir: str
  metric: str
  k: int
  chosen: list  # [(step, value)], lowest value first
  ignored: list  # steps of the checkpoints on disk without a value of the metric
  on_disk: list  # steps of every checkpoint on disk
  config: object  # the run's `llada_jax.ModelConfig`
  tokenizer_dir: str | None  # the run's tokenizer directory (None: byte-level ids)
  out: str


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir/checkpoints` (orbax step directories;
  unfinished writes are temporary directories with other names), ascending."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def read_metrics(path: str) -> list[dict]:
  """The rows of a `metrics.jsonl` file (blank lines skipped; a broken line is one error)."""
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{i}: not a JSON row ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise InputError(f"{path}:{i}: a row without an integer 'step'")
      rows.append(row)
  return rows


def metric_by_step(rows: list[dict], metric: str, path: str = METRICS_NAME) -> dict[int, float]:
  """`{step: value}` of `metric` over `rows` (the last row of a step with it wins). Raises one
  line when no row records `metric` (naming the scalar keys there are) or it is not a number."""
  if not any(metric in r for r in rows):
    keys = sorted({k for r in rows for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    hint = " (evaluation rows need eval_every > 0 in the run)" if metric.startswith("eval_") else ""
    raise InputError(f"--metric {metric}: no row of {path} records it{hint}; it records "
                     + (", ".join(keys) or "no numbers"))
  out = {}
  for r in rows:
    if metric not in r:
      continue
    v = r[metric]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise InputError(f"--metric {metric}: not a number in {path} (step {r['step']}: "
                       f"{type(v).__name__}); choose a scalar metric")
    out[r["step"]] = float(v)
  return out


def select(steps: list[int], values: dict[int, float], k: int) -> tuple[list, list]:
  """(chosen, ignored): the up to `k` steps of `steps` with the lowest finite value, as
  `[(step, value)]` lowest first (ties: the earlier step), and the steps without one."""
  have = [(values[s], s) for s in steps if s in values and math.isfinite(values[s])]
  ignored = [s for s in steps if not (s in values and math.isfinite(values[s]))]
  return [(s, v) for v, s in sorted(have)[:k]], ignored


def _steps_text(steps: list[int], most: int = 8) -> str:
  shown = ", ".join(map(str, steps[:most]))
  return shown + (f" and {len(steps) - most} more" if len(steps) > most else "")


def _model_config(workdir: str):
  """(the run's `ModelConfig`, its training config as a dict), from the config record the
  trainer writes in `workdir`."""
  from llada_jax.config import ModelConfig  # noqa: PLC0415
  from llada_jax.train import run_files  # noqa: PLC0415
  record = run_files.read(workdir)
  path = os.path.join(workdir, run_files.CONFIG_NAME)
  if record is None:
    raise InputError(f"{workdir} has no {run_files.CONFIG_NAME} (the record python -m "
                     "llada_jax.train writes of its config)")
  model = record.get("model_config") if isinstance(record, dict) else None
  if not isinstance(model, dict):
    raise InputError(f"{path} has no model_config (not written by python -m llada_jax.train)")
  try:
    return ModelConfig(**model), record.get("train", {})
  except TypeError as e:
    raise InputError(f"{path}: model_config does not fit this version's ModelConfig "
                     f"({e})") from None


def plan(args) -> MergePlan:
  """Checks the flags and the run directory and decides what to merge (reads no weights)."""
  if args.k < 1:
    raise InputError(f"--k {args.k}: must be >= 1")
  workdir = args.workdir
  if not os.path.isdir(workdir):
    raise InputError(f"no such run directory: {workdir}")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise InputError(f"{workdir} has no checkpoints ({os.path.join(workdir, 'checkpoints')}/"
                     "<step>/ written by python -m llada_jax.train)")
  config, train = _model_config(workdir)
  metrics_path = os.path.join(workdir, METRICS_NAME)
  if not os.path.isfile(metrics_path):
    raise InputError(f"{workdir} has no {METRICS_NAME}")
  values = metric_by_step(read_metrics(metrics_path), args.metric, metrics_path)
  chosen, ignored = select(steps, values, args.k)
  if not chosen:
    raise InputError(f"none of the {len(steps)} checkpoints in {workdir} (steps "
                     f"{_steps_text(steps)}) has a finite {args.metric} recorded at its step")
  if len(chosen) < args.k and not args.allow_fewer:
    raise InputError(f"--k {args.k}: only {len(chosen)} checkpoint(s) in {workdir} have a value "
                     f"of {args.metric} recorded at their step (steps "
                     f"{_steps_text(sorted(s for s, _ in chosen))}); lower --k or add "
                     "--allow-fewer")
  for step, _ in chosen:
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    if not os.path.isdir(state):
      raise InputError(f"checkpoint step {step} has no train state ({state})")
  out = args.out or os.path.join(workdir, f"merged_top{args.k}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f"--out {out}: exists and is not a directory")
  tokenizer = train.get("tokenizer", "bytes") if isinstance(train, dict) else "bytes"
  return MergePlan(workdir=workdir, metric=args.metric, k=args.k, chosen=chosen,
                   ignored=ignored, on_disk=steps, config=config, out=out,
                   tokenizer_dir=None if tokenizer in ("", "bytes", None) else tokenizer)


# ---- restoring and averaging --------------------------------------------------------------------
def restore_params(workdir: str, step: int, shapes):
  """The params of checkpoint `step` as host numpy arrays, in the checkpoint's dtype: orbax's
  partial restore of the `params` subtree of the saved train state (the optimizer state is not
  read), structured by `shapes` (`llada_jax.param_shapes`), with no mesh or device needed."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
  args = jax.tree_util.tree_map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
  try:
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item={"params": shapes}, restore_args={"params": args}, partial_restore=True))
  except (ValueError, KeyError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise InputError(f"checkpoint step {step}: its params do not fit the run's model config "
                     f"({first})") from None
  return out["params"]


def average_params(workdir: str, steps: list[int], shapes, log=print):
  """The float32 mean of the params of checkpoints `steps`: each is restored in turn and added
  leaf by leaf to a float32 running sum (the sum and one checkpoint in memory, never k)."""
  import jax  # noqa: PLC0415
  total, treedef = None, None
  for i, step in enumerate(steps, 1):
    log(f"  restoring step {step} ({i}/{len(steps)})")
    leaves, tdef = jax.tree_util.tree_flatten(restore_params(workdir, step, shapes))
    if total is None:
      total, treedef = [np.asarray(x, np.float32).copy() for x in leaves], tdef
    else:
      for acc, x in zip(total, leaves, strict=True):
        acc += np.asarray(x, np.float32)
    del leaves
  for acc in total:
    acc /= np.float32(len(steps))
  return jax.tree_util.tree_unflatten(treedef, total)


# ---- the command --------------------------------------------------------------------------------
def print_table(p: MergePlan) -> None:
  """The chosen steps and their metric values, lowest first."""
  print(f"top {len(p.chosen)} of {len(p.on_disk)} checkpoints in {p.workdir} by {p.metric} (lowest "
        "first):")
  width = max(len(p.metric), 10)
  print(f"  {'step':>8}  {p.metric:>{width}}")
  for step, value in p.chosen:
    print(f"  {step:>8}  {value:>{width}.6g}")


def merge(p: MergePlan) -> dict:
  """Averages the chosen checkpoints and writes the HF checkpoint and `merge.json` to
  `p.out`; returns the `merge.json` record."""
  import llada_jax  # noqa: PLC0415
  from llada_jax.train import run_files  # noqa: PLC0415
  c = p.config
  steps = [s for s, _ in p.chosen]
  print(f"averaging {len(steps)} checkpoint(s) in float32:", flush=True)
  params = average_params(p.workdir, steps, llada_jax.param_shapes(c),
                          log=lambda m: print(m, flush=True))
  llada_jax.save_hf_checkpoint(p.out, c, params, dtype=c.dtype)
  tokenizer_files = []
  if p.tokenizer_dir:
    if os.path.isdir(p.tokenizer_dir):
      tokenizer_files = copy_tokenizer(p.tokenizer_dir, p.out)
    else:
      print(f"warning: the run's tokenizer directory {p.tokenizer_dir} is gone: no tokenizer "
            "files copied", file=sys.stderr)
  record = dict(metric=p.metric, k=p.k, steps=steps, values=[v for _, v in p.chosen],
                ignored_steps=p.ignored, workdir=os.path.abspath(p.workdir), dtype=c.dtype,
                tokenizer_files=tokenizer_files)
  run_files.write_json(os.path.join(p.out, MERGE_NAME), record)
  return record


def run(argv=None) -> int:
  args = build_parser().parse_args(argv)
  p = plan(args)
  if p.ignored:
    print(f"{len(p.ignored)} checkpoint(s) without a finite {p.metric} at their step ignored "
          f"(steps {_steps_text(p.ignored)})")
  print_table(p)
  merge(p)
  print(f"wrote {p.out}: the mean of steps {_steps_text([s for s, _ in p.chosen])} "
        f"({p.config.dtype}), and {MERGE_NAME}")
  return 0


def main(argv=None) -> int:
  """`run` inside the error boundary (`llada_jax.errors.run_main`): bad input is one line and
  exit status 2. `argv` excludes the program name (None: `sys.argv[1:]`)."""
  return run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
