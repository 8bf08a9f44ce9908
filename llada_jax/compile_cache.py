"""The persistent JAX compilation cache of the command-line entry points (decode, serve, train).

On by default in the user's cache directory (`$LLADA_JAX_CACHE_DIR`, else
`$XDG_CACHE_HOME/llada_jax/jax`, else `~/.cache/llada_jax/jax`), so a repeated command loads its
compiled programs instead of compiling them again. `--no-compilation-cache` or
`LLADA_JAX_COMPILATION_CACHE=0` turns it off.
"""

from __future__ import annotations

import os

ENV_OFF = "LLADA_JAX_COMPILATION_CACHE"
ENV_DIR = "LLADA_JAX_CACHE_DIR"


def default_dir() -> str:
  if os.environ.get(ENV_DIR):
    return os.environ[ENV_DIR]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "llada_jax", "jax")


def enabled_by_env() -> bool:
  return os.environ.get(ENV_OFF, "1").strip().lower() not in ("0", "false", "no", "off")


def enable(flag: bool | None = None, path: str | None = None) -> str | None:
  """Turns the cache on (`flag` True, or None and not switched off by the environment) and
  returns its directory, or returns None. Programs that compile in under 0.2 s are not
  stored. An unusable directory leaves the cache off (JAX compiles as usual)."""
  if flag is False or (flag is None and not enabled_by_env()):
    return None
  import jax  # noqa: PLC0415
  path = path or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def add_flag(parser) -> None:
  """`--compilation-cache` / `--no-compilation-cache` on an argparse parser."""
  import argparse  # noqa: PLC0415
  parser.add_argument("--compilation-cache", dest="compilation_cache",
                      action=argparse.BooleanOptionalAction, default=None,
                      help=f"persistent compilation cache in {default_dir()} (default: on; "
                      f"{ENV_OFF}=0 turns it off)")
