"""Full-width smoke run of pod inference on a CPU host: the real LLaDA2.1-mini widths (hidden 2048,
256 experts in 8 groups, top-8, vocab 157,184) with few layers, as a sharded bf16 HF checkpoint,
decoded through the CLI on 8 fake CPU devices with an expert-parallel mesh and, for comparison,
on one device.

  python tools/smoke_full_width.py [--layers 2] [--mesh auto] [--gen-length 64]

Prints, per run: checkpoint load time, peak host memory of the CLI process (every fake device's
arrays live in host memory), decode time with and without compilation, time per forward, and
whether both runs decoded the same tokens. `--small` uses narrow widths (a CI-sized check of the
same path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def smoke_config(layers: int, small: bool):
  """LLaDA2.1-mini with `layers` layers (the first dense), or a narrow stand-in (`small`)."""
  import llada_jax
  c = llada_jax.get_preset("llada2_1_mini")
  if small:
    c = c.replace(vocab_size=4096, hidden_size=128, num_attention_heads=4, head_dim=32,
                  intermediate_size=256, moe_intermediate_size=32, num_experts=32,
                  pad_token_id=4000, eos_token_id=4000, mask_token_id=4001)
  return c.replace(num_hidden_layers=layers, max_position_embeddings=4096)


def write_random_checkpoint(path: str, config, seed: int = 0, shard_gb: float = 1.0) -> float:
  """A random bf16 checkpoint of `config` at `path` (leaf by leaf on the host, in numpy, so the
  generator holds one fp32 leaf at a time); returns the size in GB."""
  import jax
  import ml_dtypes
  import llada_jax
  from llada_jax.model.params import _is_spec, leaf_dtype, param_specs
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=_is_spec)
  out = []
  for keys, (shape, _) in leaves:
    name = getattr(keys[-1], "key", str(keys[-1]))
    dtype = leaf_dtype(config, tuple(getattr(k, "key", str(k)) for k in keys))
    if name.endswith("norm"):
      x = np.ones(shape, np.float32)
    elif name == "expert_bias":
      x = np.zeros(shape, np.float32)
    else:
      scale = 1.0 if name == "embed" else 1.0 / np.sqrt(shape[-2])
      x = (rng.standard_normal(shape, np.float32) * np.float32(scale))
    out.append(x.astype(ml_dtypes.bfloat16 if np.dtype(dtype).name == "bfloat16" else dtype))
  params = jax.tree_util.tree_unflatten(treedef, out)
  llada_jax.save_hf_checkpoint(path, config, params, max_shard_bytes=int(shard_gb * 1e9))
  return sum(x.nbytes for x in out) / 1e9


def run_cli(ckpt: str, mesh: str | None, devices: int, prompt: list[int], gen_length: int,
            block_length: int, dtype: str) -> dict:
  """`python -m llada_jax.decode ... --timing --format json` in a fresh process; its JSON plus
  the process's peak resident memory."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  argv = [sys.executable, "-m", "llada_jax.decode", "--checkpoint", ckpt, "--prompt-ids",
          ",".join(map(str, prompt)), "--gen-length", str(gen_length), "--block-length",
          str(block_length), "--format", "json", "--timing", "--mesh", mesh or "none",
          "--dtype", dtype]
  t0 = time.perf_counter()
  with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
    p = subprocess.Popen(argv, stdout=so, stderr=se, text=True, env=env, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)  # this child's own peak memory
    p.returncode = os.waitstatus_to_exitcode(status)
    so.seek(0), se.seek(0)
    stdout, stderr = so.read(), se.read()
  wall = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f"decode CLI failed ({mesh}, exit {p.returncode}, peak host memory "
                     f"{usage.ru_maxrss / 2**20:.2f} GB):\n{stderr[-3000:]}")
  out = json.loads(stdout.strip().splitlines()[-1])
  out.update(wall_seconds=round(wall, 1), peak_rss_gb=round(usage.ru_maxrss / 2**20, 2))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=2, help="layers (the first is dense)")
  ap.add_argument("--mesh", default="auto", help="the CLI's --mesh (auto: expert=8 here)")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--gen-length", type=int, default=64)
  ap.add_argument("--block-length", type=int, default=32)
  ap.add_argument("--prompt-length", type=int, default=40)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                  help="compute dtype (float32: sharded and unsharded tokens should agree)")
  ap.add_argument("--small", action="store_true", help="narrow widths (a quick check)")
  ap.add_argument("--workdir", default=None, help="where to write the checkpoint (default: tmp)")
  args = ap.parse_args(argv)
  config = smoke_config(args.layers, args.small)
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    ckpt = os.path.join(tmp, "ckpt")
    t0 = time.perf_counter()
    gb = write_random_checkpoint(ckpt, config)
    files = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    print(f"checkpoint: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_experts} experts top-{config.num_experts_per_tok}, vocab "
          f"{config.vocab_size}: {gb:.2f} GB bf16 in {len(files)} shards "
          f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
    prompt = [int(x) for x in np.random.default_rng(1).integers(0, 4000, args.prompt_length)]
    runs = {}
    for label, mesh, devices in ((args.mesh, args.mesh, args.devices), ("1 device", None, 1)):
      runs[label] = r = run_cli(ckpt, mesh, devices, prompt, args.gen_length,
                                args.block_length, args.dtype)
      print(f"{label}: {json.dumps({k: r[k] for k in ('mesh', 'load_seconds', 'seconds', 'run_seconds', 'seconds_per_forward', 'nfe', 'peak_rss_gb')})}", flush=True)
  a, b = (r["output_ids"] for r in runs.values())
  agree = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
  print()
  print(f"{args.dtype} compute; {len(prompt)}-token prompt, {args.gen_length} new tokens, block "
        f"{args.block_length}")
  print("| run | load s | peak host GB | decode s (incl. compile) | decode s | ms / forward | "
        "NFE |")
  print("|---|---|---|---|---|---|---|")
  for label, r in runs.items():
    print(f"| {label} | {r['load_seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['seconds']:.1f} | "
          f"{r['run_seconds']:.2f} | {1e3 * r['seconds_per_forward']:.0f} | {r['nfe']} |")
  print(f"\ntoken agreement sharded vs unsharded: {agree:.3f} (random weights: near-ties in "
        f"{args.dtype} can round either way)")
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402 (the one error boundary of every CLI)
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
