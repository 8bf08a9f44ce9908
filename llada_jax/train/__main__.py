"""`python -m llada_jax.train --config configs/NAME.py --workdir DIR [--config.key=value ...]`.

Exit status: 0 done; 2 bad config, flags or data, or a run directory started with another
config (one line, before any compilation; `--force` resumes it anyway); 3 non-finite loss (the
last good checkpoint is kept); 75 stopped by SIGTERM, 130 by Ctrl-C, after finishing the step and
saving a checkpoint (rerun to resume).

Many hosts: `--coordinator_address HOST:PORT --num_processes N --process_id I` (or the
LLADA_* / JAX_* environment variables, or `--distributed auto` on a TPU pod; see
`llada_jax.parallel.distributed`) start `jax.distributed` first; one process is the default.
Every process runs the same command; process 0 writes the metrics, TensorBoard and exports.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import types

from absl import flags
from ml_collections import config_flags

from llada_jax.errors import DEBUG_FLAG, EXIT_INTERRUPTED, InputError, describe, run_main

PREEMPTED_EXIT = 75


def _define_flags(fv: flags.FlagValues, argv: list[str]) -> types.SimpleNamespace:
  """This command's flags, on their own `FlagValues` (a fresh set per call, so `main` can run
  several times in one process); `argv` holds the `--config.KEY` overrides to define."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "training config file",
                                             flag_values=fv, lock_config=True, sys_argv=argv),
      workdir=flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)",
                                  flag_values=fv),
      export_hf=flags.DEFINE_string("export_hf", None,
                                    "write the final params here in HF format", flag_values=fv),
      no_progress=flags.DEFINE_bool("no_progress", False, "disable the progress bar",
                                    flag_values=fv),
      force=flags.DEFINE_bool("force", False,
                              "resume a run directory started with another config",
                              flag_values=fv),
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", None, "multi-host: host:port of process 0", flag_values=fv),
      num_processes=flags.DEFINE_integer("num_processes", None,
                                         "multi-host: number of processes", flag_values=fv),
      process_id=flags.DEFINE_integer("process_id", None, "multi-host: this process's index",
                                      flag_values=fv),
      local_device_count=flags.DEFINE_integer(
          "local_device_count", None, "CPU only: devices of this process (testing)",
          flag_values=fv),
      distributed=flags.DEFINE_enum(
          "distributed", None, ["auto", "off"],
          "auto: let JAX detect the cluster; off: stay single-process", flag_values=fv),
      compilation_cache=flags.DEFINE_bool(
          "compilation_cache", True, "persistent compilation cache in the user's cache "
          "directory (LLADA_JAX_COMPILATION_CACHE=0 also turns it off)", flag_values=fv))


def _one_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _start_distributed(f) -> None:
  """`jax.distributed.initialize` from the flags or the environment (no-op for one process)."""
  from llada_jax.parallel import distributed  # noqa: PLC0415
  args = types.SimpleNamespace(**{k: getattr(f, k).value for k in (
      "coordinator_address", "num_processes", "process_id", "local_device_count",
      "distributed")})
  distributed.initialize(distributed.config_from(args))


def usage() -> str:
  """`--help`: the command, its flags and how to override config keys."""
  fv = flags.FlagValues()
  _define_flags(fv, [])
  lines = [__doc__.strip(), "", "flags:"]
  for name in fv:
    f = fv[name]
    default = "" if f.default in (None, "") else f" (default {f.default})"
    lines.append(f"  --{f.name}: {f.help}{default}")
  lines += ["  --config.KEY=VALUE: override a key of the config file, e.g. --config.steps=10 "
            "--config.data.source=corpus.txt --config.mesh=fsdp=2,expert=4",
            "  --debug: show the traceback of a reported error"]
  return "\n".join(lines)


def _unknown_override(argv: list[str], e: BaseException) -> str | None:
  """The `--config.KEY` argument whose key the config file does not define, found from the
  quoted key in ml_collections' error."""
  for key in re.findall(r"\\?'([A-Za-z_][A-Za-z0-9_]*)\\?'", str(e)):
    for arg in argv:
      path = arg.split("=", 1)[0]
      if path.startswith("--config.") and path.split(".")[-1] == key or f".{key}." in path:
        return path
  return None


def _config_file_error(e: BaseException) -> str:
  """ml_collections' multi-line load failure reduced to its cause."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return next((ln for ln in reversed(lines) if ln.startswith("[Errno")),
              lines[-1] if lines else type(e).__name__)


def _parse(argv: list[str]):
  """absl flag parsing into a fresh `FlagValues`; returns the flags. Every failure is one
  `InputError` line naming the flag, the config file or the config key."""
  argv = [a for a in argv if a != DEBUG_FLAG]
  fv = flags.FlagValues()
  f = _define_flags(fv, argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise InputError(f"{_one_line(e)} (see --help)") from None
  except SyntaxError as e:  # the config file is not valid Python
    raise InputError(f"--config: {e.filename}:{e.lineno}: {e.msg}") from None
  except (ImportError, NameError) as e:
    raise InputError(f"--config: the config file fails to load: {type(e).__name__}: "
                     f"{_one_line(e)}") from None
  except (KeyError, AttributeError, ValueError, TypeError, OSError) as e:
    unknown = _unknown_override(argv, e)
    if unknown:
      hint = re.search(r'Did you mean "[^"]+"', str(e))
      raise InputError(f"{unknown}: no such key in the config file"
                       + (f" ({hint.group(0)}?)" if hint else "")) from None
    raise InputError(f"bad --config override: {_one_line(e)}") from None
  if not fv["config"].present:
    return f
  try:
    f.config.value.keys()  # a config file that failed to load is an object raising on use
    return f
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    raise InputError(f"--config: {_config_file_error(e)}") from None


def run(argv=None) -> int:
  argv = ["llada_jax.train", *(sys.argv[1:] if argv is None else argv)]
  if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
    print(usage())
    return 0
  f = _parse(argv)
  cfg = f.config.value
  if cfg is None or not f.workdir.value:
    raise InputError("--config FILE and --workdir DIR are required (see --help)")
  _start_distributed(f)
  from llada_jax import compile_cache  # noqa: PLC0415
  compile_cache.enable(None if f.compilation_cache.value else False)
  from llada_jax.train.trainer import (CheckpointWriteError, NonFiniteLoss,  # noqa: PLC0415
                                       Trainer, _has_checkpoint, _is_main)
  if f.export_hf.value:
    with cfg.unlocked():
      cfg.export_hf = f.export_hf.value
  workdir = f.workdir.value
  new_workdir = not os.path.exists(workdir)
  trainer = None
  try:
    trainer = Trainer(cfg, workdir, progress=not f.no_progress.value, force=f.force.value)
    last = trainer.run()
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except CheckpointWriteError:
    _quiet_abandoned_writers()
    raise
  except Exception as e:  # noqa: BLE001 (re-raised: run_main reports it)
    started = trainer is not None and trainer.stepped
    if (describe(e) is not None and new_workdir and not started
        and not _has_checkpoint(os.path.join(workdir, "checkpoints")) and _is_main()):
      # a bad input (config, data, files) found before any step leaves no run directory
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  if trainer.preempted:
    why = "interrupted" if trainer.preempted_by == "SIGINT" else "preempted"
    print(f"{why}: stopped after step {trainer.preempted_at} and saved a checkpoint; "
          "rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED if why == "interrupted" else PREEMPTED_EXIT
  print(" ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0


def _quiet_abandoned_writers() -> None:
  """After a failed checkpoint write, orbax's abandoned writer futures would print their
  (already reported) errors while the interpreter shuts down, after our one line."""
  import logging  # noqa: PLC0415
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  import warnings  # noqa: PLC0415
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def main(argv=None) -> int:
  """`run` inside the error boundary: a bad config, flag or data file is one line and status 2
  before any compilation (`--debug` shows the traceback), a bug keeps its traceback. The first
  Ctrl-C finishes the step, saves a checkpoint and exits 130; a second one ends at once.
  `argv` excludes the program name (None: `sys.argv[1:]`)."""
  return run_main(run, argv, hard_interrupt=False)


if __name__ == "__main__":
  sys.exit(main())
