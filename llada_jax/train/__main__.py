"""`python -m llada_jax.train --config configs/NAME.py --workdir DIR [--config.key=value ...]`.

Exit status: 0 done; 2 bad config or flags, or a run directory started with another config
(one line; `--force` resumes it anyway); 3 non-finite loss (the last good checkpoint is kept);
75 stopped by SIGTERM after finishing the step and saving a checkpoint (rerun to resume).

Many hosts: `--coordinator_address HOST:PORT --num_processes N --process_id I` (or the
LLADA_* / JAX_* environment variables, or `--distributed auto` on a TPU pod; see
`llada_jax.parallel.distributed`) start `jax.distributed` first; one process is the default.
Every process runs the same command; process 0 writes the metrics, TensorBoard and exports.
"""

from __future__ import annotations

import sys
import types

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
_EXPORT = flags.DEFINE_string("export_hf", None, "write the final params here in HF format")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "disable the progress bar")
_FORCE = flags.DEFINE_bool("force", False, "resume a run directory started with another config")
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROC_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_LOCAL_DEV = flags.DEFINE_integer("local_device_count", None,
                                  "CPU only: devices of this process (testing)")
_DIST = flags.DEFINE_enum("distributed", None, ["auto", "off"],
                          "auto: let JAX detect the cluster; off: stay single-process")

PREEMPTED_EXIT = 75


def _one_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _start_distributed() -> None:
  """`jax.distributed.initialize` from the flags or the environment (no-op for one process)."""
  from llada_jax.parallel import distributed  # noqa: PLC0415
  args = types.SimpleNamespace(coordinator_address=_COORD.value, num_processes=_NUM_PROC.value,
                               process_id=_PROC_ID.value, local_device_count=_LOCAL_DEV.value,
                               distributed=_DIST.value)
  distributed.initialize(distributed.config_from(args))


def main(argv=None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, FileNotFoundError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: --config FILE and --workdir DIR are required", file=sys.stderr)
    return 2
  try:
    _start_distributed()
  except ValueError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  from llada_jax.train.trainer import ConfigError, NonFiniteLoss, RunMismatch, Trainer
  cfg = _CONFIG.value
  if _EXPORT.value:
    with cfg.unlocked():
      cfg.export_hf = _EXPORT.value
  try:
    trainer = Trainer(cfg, _WORKDIR.value, progress=not _NO_PROGRESS.value, force=_FORCE.value)
  except RunMismatch as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ConfigError as e:
    print(f"error: invalid config: {e}", file=sys.stderr)
    return 2
  try:
    last = trainer.run()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  if trainer.preempted:
    print(f"preempted: stopped after step {trainer.preempted_at} and saved a checkpoint; "
          "rerun the same command to resume", file=sys.stderr)
    return PREEMPTED_EXIT
  print(" ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
