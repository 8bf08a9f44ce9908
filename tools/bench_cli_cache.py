"""First vs repeat call of the decode CLI with the persistent compilation cache.

  python tools/bench_cli_cache.py [-- extra decode flags]

Runs the README's first command (`python -m llada_jax.decode --mode=quality --prompt
"def fibonacci(n):"`) three times in fresh processes: with an empty cache directory (the first
call of a user), again with the now filled cache (the repeat call), and with the cache off.
Prints the wall time of each, and the ratio, as a markdown table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cache_dir: str | None, extra: list[str]) -> float:
  env = dict(os.environ, PYTHONPATH=ROOT, LLADA_JAX_COMPILATION_CACHE="1" if cache_dir else "0")
  if cache_dir:
    env["LLADA_JAX_CACHE_DIR"] = cache_dir
  argv = [sys.executable, "-m", "llada_jax.decode", "--mode=quality", "--prompt",
          "def fibonacci(n):", *extra]
  t0 = time.perf_counter()
  subprocess.run(argv, env=env, check=True, capture_output=True, cwd=ROOT)
  return time.perf_counter() - t0


def main(argv=None) -> int:
  extra = list(sys.argv[1:] if argv is None else argv)
  if extra[:1] == ["--"]:
    extra = extra[1:]
  with tempfile.TemporaryDirectory() as cache:
    first = _run(cache, extra)
    repeat = _run(cache, extra)
  off = _run(None, extra)
  print("| call | wall s |")
  print("|---|---|")
  print(f"| first (empty compilation cache) | {first:.1f} |")
  print(f"| repeat (warm cache) | {repeat:.1f} |")
  print(f"| cache off | {off:.1f} |")
  print(f"\nrepeat call {first / repeat:.2f}x faster than the first")
  return 0


if __name__ == "__main__":
  sys.exit(main())
