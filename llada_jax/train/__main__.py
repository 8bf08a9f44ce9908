"""`python -m llada_jax.train --config configs/NAME.py --workdir DIR [--config.key=value ...]`.

Bad configs and flags print one line and exit with status 2; a non-finite loss stops the run
(exit status 3) and keeps the last good checkpoint.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
_EXPORT = flags.DEFINE_string("export_hf", None, "write the final params here in HF format")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "disable the progress bar")


def main(argv=None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 2
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: --config FILE and --workdir DIR are required", file=sys.stderr)
    return 2
  from llada_jax.train.trainer import ConfigError, NonFiniteLoss, Trainer
  cfg = _CONFIG.value
  if _EXPORT.value:
    with cfg.unlocked():
      cfg.export_hf = _EXPORT.value
  try:
    trainer = Trainer(cfg, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except ConfigError as e:
    print(f"error: invalid config: {e}", file=sys.stderr)
    return 2
  try:
    last = trainer.run()
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  print(" ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
