"""What a run directory records about itself: `config.json` (the training and model config it was
started with; a resume with another config is refused) and `run_info.json` (mesh, devices,
processes, bytes per device of the train state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from llada_jax.errors import InputError

CONFIG_NAME = "config.json"
RUN_INFO_NAME = "run_info.json"
# Keys that may change between a run and its resumption: where and how it runs, how often it
# logs and saves, but not what it computes.
OPERATIONAL = ("workdir", "export_hf", "log_every", "eval_every", "eval_batches", "ckpt_every",
               "keep", "debug_kill_at_step",
               "debug_term_at_step", "data.dataset_dir", "mesh", "rules", "grad_accum_steps",
               "objective.attention_impl", "objective.moe_impl", "objective.remat")
# Identity keys added after runs were first written: a run written before one of them ran with
# this value (so resuming it is not a mismatch).
ADDED = {"dpo.reference": "online"}
# What an explicit warm start moves aside (into `superseded/<time>/`) before starting over.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", RUN_INFO_NAME, CONFIG_NAME)


class RunMismatch(InputError):
  """The run directory was started with another config (one line, exit status 2)."""


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


def record(cfg, model) -> dict:
  """The identity of a run: its training config and its model config, as JSON values."""
  return dict(train=_jsonable(cfg.to_dict()), model_config=_jsonable(dataclasses.asdict(model)))


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def _operational(key: str) -> bool:
  key = key.removeprefix("train.")
  return any(key == k or key.startswith(k + ".") for k in OPERATIONAL)


def differences(old: dict, new: dict) -> list[str]:
  """`key: old -> new` for every identity key that differs (operational keys ignored)."""
  a, b = _flatten(old), _flatten(new)
  for k, v in ADDED.items():
    for flat in (a, b):
      flat.setdefault("train." + k, v)
  out = []
  for k in sorted(set(a) | set(b)):
    if not _operational(k) and a.get(k) != b.get(k):
      out.append(f"{k.removeprefix('train.')}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}")
  return out


def read(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: dict) -> None:
  """Writes `obj` to `path` atomically (temporary file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def check(workdir: str, new: dict, *, has_checkpoint: bool, force: bool) -> str:
  """Decides how a run may use `workdir`: "fresh" (nothing recorded or nothing saved yet),
  "resume" (same config), "forced" (another config, --force), "warm_start" (another config whose
  `init_from` names new weights: the old run is moved aside). Raises `RunMismatch` otherwise."""
  old = read(workdir)
  if old is None or not has_checkpoint:
    return "fresh"
  diff = differences(old, new)
  if not diff:
    return "resume"
  if force:
    return "forced"
  init_new, init_old = new["train"].get("init_from"), old.get("train", {}).get("init_from")
  if init_new and init_new != init_old:
    return "warm_start"
  shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
  raise RunMismatch(
      f"{workdir} holds a run started with another config ({shown}); rerun with its config, "
      "add --force to resume it with this one, or use a new --workdir (an explicit warm start: "
      "--config.init_from=HF_DIR)")


def supersede(workdir: str) -> str:
  """Moves the outputs of the run in `workdir` to `workdir/superseded/<time>/`; returns it."""
  dest = os.path.join(workdir, "superseded", time.strftime("%Y%m%d-%H%M%S"))
  os.makedirs(dest, exist_ok=True)
  for name in RUN_OUTPUTS:
    src = os.path.join(workdir, name)
    if os.path.exists(src):
      shutil.move(src, os.path.join(dest, name))
  return dest
