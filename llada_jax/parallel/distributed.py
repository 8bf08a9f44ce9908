"""Multi-host start-up: `jax.distributed.initialize` from command-line flags or the environment.

Settings (a flag wins over its environment variable; JAX's own variables are honoured too):

  --coordinator_address  LLADA_COORDINATOR_ADDRESS  (or JAX_COORDINATOR_ADDRESS)  host:port
  --num_processes        LLADA_NUM_PROCESSES        (or JAX_NUM_PROCESSES)
  --process_id           LLADA_PROCESS_ID           (or JAX_PROCESS_ID)
  --local_device_count   LLADA_LOCAL_DEVICE_COUNT   CPU only: devices per process
  --distributed          LLADA_DISTRIBUTED=auto     "auto": let JAX detect the cluster (TPU pods,
                                                    SLURM, ...), "off": never initialise

With none of them set, nothing happens (a single process). On CPU the cross-process collectives
use gloo (`jax_cpu_collectives_implementation`). Call `initialize` before any other JAX work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Mapping

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_count: int | None = None
  mode: str = "explicit"  # "explicit" (use the fields), "auto" (cluster detection), "off"
  initialization_timeout: int = 120

  @property
  def enabled(self) -> bool:
    if self.mode == "off":
      return False
    return self.mode == "auto" or self.coordinator_address is not None


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the multi-host flags to an argparse parser."""
  g = parser.add_argument_group("multi-host")
  g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  g.add_argument("--num_processes", type=int, default=None)
  g.add_argument("--process_id", type=int, default=None)
  g.add_argument("--local_device_count", type=int, default=None,
                 help="CPU devices per process (testing)")
  g.add_argument("--distributed", default=None, choices=["auto", "off"],
                 help="auto: let JAX detect the cluster; off: stay single-process")
  return parser


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
  for n in names:
    if env.get(n, "").strip():
      try:
        return int(env[n])
      except ValueError:
        raise ValueError(f"environment variable {n}={env[n]!r} is not an integer") from None
  return None


def config_from(args: argparse.Namespace | None = None,
                env: Mapping[str, str] | None = None) -> DistributedConfig:
  """Flags (an argparse namespace from `add_flags`, may be None) over environment variables."""
  env = os.environ if env is None else env
  get = lambda name: getattr(args, name, None) if args is not None else None
  address = get("coordinator_address") or env.get("LLADA_COORDINATOR_ADDRESS") or env.get(
      "JAX_COORDINATOR_ADDRESS") or None
  num = get("num_processes")
  num = num if num is not None else _env_int(env, "LLADA_NUM_PROCESSES", "JAX_NUM_PROCESSES")
  pid = get("process_id")
  pid = pid if pid is not None else _env_int(env, "LLADA_PROCESS_ID", "JAX_PROCESS_ID")
  local = get("local_device_count")
  local = local if local is not None else _env_int(env, "LLADA_LOCAL_DEVICE_COUNT")
  mode = get("distributed") or env.get("LLADA_DISTRIBUTED") or "explicit"
  if mode not in ("explicit", "auto", "off"):
    raise ValueError(f"LLADA_DISTRIBUTED must be 'auto' or 'off', got {mode!r}")
  cfg = DistributedConfig(address, num, pid, local, mode)
  if mode == "explicit" and address is not None and (num is None or pid is None):
    raise ValueError("a coordinator address needs num_processes and process_id")
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ValueError(f"process_id {pid} is outside [0, {num})")
  return cfg


def initialize(cfg: DistributedConfig | None = None, *, platform: str | None = None) -> bool:
  """Initialises `jax.distributed` per `cfg` (default: `config_from()`); returns whether it did.

  `platform="cpu"` (or JAX_PLATFORMS=cpu) also selects the gloo CPU collectives and, with
  `local_device_count`, the number of CPU devices of this process.
  """
  cfg = config_from() if cfg is None else cfg
  platform = platform or os.environ.get("JAX_PLATFORMS", "").split(",")[0] or None
  if platform == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.local_device_count:
      jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
  if not cfg.enabled:
    return False
  if cfg.mode == "auto":
    jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
  else:
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
        process_id=cfg.process_id, initialization_timeout=cfg.initialization_timeout)
  return True


def describe() -> str:
  """One line: this process, the process count and the devices."""
  return (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.devices()[0].platform} devices")
