"""Decode with a LLaDA2 checkpoint: `python -m llada_jax.decode --mode=quality --prompt "..."`.

Prompts get the checkpoint's chat template when its tokenizer has one, except with the embedded
default model, a base (completion) code model: there the text is continued as it is and printed
after the prompt. `--chat` / `--no-chat` force either way.

Errors (bad flags, unknown mode, bad checkpoint, prompt too long or empty, no tokenizer for
--prompt) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from llada_jax.decode.settings import ALGORITHMS, MODES

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                                  "default_model")


class UsageError(Exception):
  pass


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line instead of argparse's usage block
    raise UsageError(message)


def _bool_flag(p, name, help_):
  p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                 default=None, help=help_)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m llada_jax.decode", description="LLaDA2 block-diffusion decoding")
  p.add_argument("--checkpoint", default=None,
                 help="HF checkpoint directory or hub id such as inclusionAI/LLaDA2.1-mini "
                 "(downloaded on first use; default: the embedded model)")
  p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
  p.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
  _bool_flag(p, "chat", "apply the tokenizer's chat template to --prompt (default: when it has "
             "one, except for the embedded base model, which completes text)")
  p.add_argument("--mode", default="quality", help=f"one of {', '.join(MODES)}")
  p.add_argument("--algorithm", default=None, help=f"one of {', '.join(ALGORITHMS)}")
  p.add_argument("--gen-length", type=int, default=128)
  p.add_argument("--block-length", type=int, default=None)
  p.add_argument("--threshold", type=float, default=None)
  p.add_argument("--editing-threshold", type=float, default=None)
  p.add_argument("--max-post-steps", type=int, default=None)
  p.add_argument("--num-to-transfer", type=int, default=None)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--eos-id", type=int, default=None, help="default: from the config")
  p.add_argument("--mask-id", type=int, default=None, help="default: from the config")
  _bool_flag(p, "eos-early-stop", "stop a row at its first EOS (default: on)")
  p.add_argument("--mbe-window", type=int, default=None, help="multi-block editing window")
  p.add_argument("--mesh", default=None,
                 help="device mesh: 'auto' (the default with more than one device: expert "
                 "parallel, then data, fsdp, tensor as memory needs), 'none', or sizes such as "
                 "'data=2,expert=4' (axes data, fsdp, expert, tensor; one may be -1)")
  p.add_argument("--moe-impl", default="auto",
                 help="auto | ragged | dense | ep | ep_ragged (auto: ragged on one device, "
                 "dropless expert parallelism on a mesh)")
  p.add_argument("--attention-impl", default="auto",
                 help="auto (the Pallas kernel on TPU, XLA elsewhere) | xla | pallas | pallas_tpu")
  p.add_argument("--update-impl", default="jnp", help="jnp | pallas | pallas_tpu")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  p.add_argument("--batch-invariant", action="store_true",
                 help="run rows one at a time (bitwise independent of the batch)")
  p.add_argument("--stream", action="store_true", help="print each block as it is committed")
  p.add_argument("--format", default="text", choices=["text", "json"])
  p.add_argument("--timing", action="store_true",
                 help="decode a second time and report the run time without compilation")
  return p


def _settings_overrides(args) -> dict:
  keys = ("algorithm", "gen_length", "block_length", "threshold", "editing_threshold",
          "max_post_steps", "num_to_transfer", "steps", "temperature", "top_k", "top_p", "seed",
          "eos_id", "mask_id", "eos_early_stop", "mbe_window")
  return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _parse_ids(text: str) -> list[int]:
  try:
    ids = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
  if not ids:
    raise UsageError("--prompt-ids is empty")
  return ids


def _mesh_spec(flag: str | None) -> str | None:
  """The --mesh flag checked (before any slow work): None (one device), "auto" or a spec.
  The default is "auto", which is one device where only one is present."""
  from llada_jax import parallel  # noqa: PLC0415
  if flag is None or flag == "auto":
    return "auto"
  if flag.strip().lower() in ("none", ""):
    return None
  parallel.parse_mesh_spec(flag)  # raises one line on a bad spec
  parallel.fake_cpu_devices(flag)
  return flag


def _resolve_mesh(spec, ckpt: str, batch: int, longest_prompt: int, args):
  """The `Mesh` for `spec`; "auto" plans with the checkpoint's config and this workload."""
  from llada_jax import parallel  # noqa: PLC0415
  from llada_jax.decode.api import prompt_bucket  # noqa: PLC0415
  bl = args.block_length or 32
  workload = parallel.Workload(batch=batch, prompt=prompt_bucket(longest_prompt, bl),
                               gen=args.gen_length, block_length=bl)
  mesh = parallel.mesh_for_checkpoint(spec, ckpt, dtype=args.dtype, workload=workload)
  if mesh is not None and args.format == "text":
    print(f"mesh: {parallel.format_mesh_shape(dict(mesh.shape))} over {mesh.size} "
          f"{mesh.devices.flat[0].platform} devices", file=sys.stderr)
  return mesh


def run(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.mode not in MODES:
    raise UsageError(f"unknown mode {args.mode!r}; choose from {', '.join(MODES)}")
  if not args.prompt and not args.prompt_ids:
    raise UsageError("give --prompt TEXT or --prompt-ids 1,2,3")
  ckpt = args.checkpoint or DEFAULT_CHECKPOINT
  if args.checkpoint is None and not os.path.isdir(ckpt):
    raise UsageError("no --checkpoint given and no embedded default model is installed")

  import llada_jax
  from llada_jax.decode.settings import DecodeSettings
  from llada_jax.tokenizer import Tokenizer
  # Validate settings and the mesh spec before the (slow) checkpoint load.
  block_length = DecodeSettings.for_mode(args.mode, **_settings_overrides(args)).block_length
  mesh_spec = _mesh_spec(args.mesh)
  if args.checkpoint is not None:  # a directory, or a hub id downloaded on first use
    from llada_jax.checkpoint import resolve_checkpoint  # noqa: PLC0415
    ckpt = resolve_checkpoint(args.checkpoint)

  tokenizer = None
  if os.path.exists(os.path.join(ckpt, "tokenizer.json")):
    tokenizer = Tokenizer.from_dir(ckpt)
  chat = args.chat
  if chat is None:
    chat = args.checkpoint is not None and bool(tokenizer and tokenizer.chat_template)
  if chat and tokenizer is not None and not tokenizer.chat_template:
    raise UsageError(f"--chat: the tokenizer in {ckpt} has no chat template")
  prompts, shown_prompts = [], []
  for text in args.prompt or []:
    if tokenizer is None:
      raise UsageError(f"--prompt needs a tokenizer.json in {ckpt}; use --prompt-ids instead")
    if not text.strip():
      raise UsageError("empty prompt")
    shown_prompts.append("" if chat else text)
    if chat:
      text = tokenizer.apply_chat_template(text)
    prompts.append(tokenizer.encode(text))
  prompts += [_parse_ids(x) for x in args.prompt_ids or []]
  shown_prompts += [""] * (len(prompts) - len(shown_prompts))

  mesh = _resolve_mesh(mesh_spec, ckpt, len(prompts), max(map(len, prompts)), args)
  t_load = time.perf_counter()
  config, params = llada_jax.load_hf_checkpoint(ckpt, dtype=args.dtype, mesh=mesh)
  load_seconds = time.perf_counter() - t_load
  on_block = None
  if args.stream and args.format == "text":
    def on_block(rows, block, canvas, prompt_len):
      for i in rows.nonzero()[0]:
        lo = max(int(prompt_len[i]), int(block[i]) * block_length)
        ids = canvas[i, lo:(int(block[i]) + 1) * block_length].tolist()
        shown = tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids))
        print(f"[row {i} block {int(block[i])}] {shown}", flush=True)
  decode = lambda: llada_jax.generate(
      params, config, prompts, mode=args.mode, attention_impl=args.attention_impl,
      update_impl=args.update_impl, moe_impl=args.moe_impl, mesh=mesh,
      batch_invariant=args.batch_invariant, on_block=on_block, **_settings_overrides(args))
  t0 = time.perf_counter()
  result = decode()
  seconds = time.perf_counter() - t0
  timing = dict(load_seconds=round(load_seconds, 3), seconds=round(seconds, 3))
  if args.timing:  # the same decode again: the compiled program's run time alone
    t0 = time.perf_counter()
    decode()
    run_seconds = time.perf_counter() - t0
    steps = max(result.nfe) + result.commits
    timing.update(run_seconds=round(run_seconds, 3),
                  seconds_per_forward=round(run_seconds / max(steps, 1), 4))
  rows = []
  for i, ids in enumerate(result.output_ids):
    row = dict(prompt_ids=prompts[i], output_ids=ids, nfe=result.nfe[i], tpf=result.tpf[i],
               fills=result.fills[i], edits=result.edits[i])
    if tokenizer is not None:
      row["text"] = tokenizer.decode(ids)
    rows.append(row)
  if args.format == "json":
    out = dict(rows[0]) if len(rows) == 1 else {"rows": rows}
    out.update(settings=dataclasses.asdict(result.settings), mode=args.mode,
               checkpoint=os.path.abspath(ckpt), mesh=None if mesh is None else dict(mesh.shape),
               **timing)
    print(json.dumps(out))
  else:
    for i, row in enumerate(rows):
      body = row.get("text", " ".join(map(str, row["output_ids"])))
      body = shown_prompts[i] + body
      prefix = f"[{i}] " if len(rows) > 1 else ""
      print(f"{prefix}{body}")
      print(f"{prefix}-- {len(row['output_ids'])} tokens, nfe {row['nfe']}, "
            f"tpf {row['tpf']:.2f}, fills {row['fills']}, edits {row['edits']}, "
            f"mode {args.mode}, {seconds:.1f}s (incl. compile)")
    if args.timing:
      print(f"-- load {load_seconds:.1f}s, decode {timing['run_seconds']:.2f}s without "
            f"compilation, {1e3 * timing['seconds_per_forward']:.1f} ms per forward")
  return 0


def main(argv=None) -> int:
  try:
    return run(argv)
  except (UsageError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
