"""Decode with a LLaDA2 checkpoint: `python -m llada_jax.decode --mode=quality --prompt "..."`.

Prompts get the checkpoint's chat template when its tokenizer has one, except with the embedded
default model, a base (completion) code model: there the text is continued as it is and printed
after the prompt. `--chat` / `--no-chat` force either way.

Every bad input (flags, decode settings, a missing or unreadable checkpoint, config.json fields
of the wrong type or range, corrupt safetensors, tokenizer or chat template files, prompts too
long or empty, non-finite weights) is reported as one line on stderr, exit status 2, before the
weights are loaded or anything is compiled where it can be known then (`llada_jax.errors`:
`--debug` or LLADA_JAX_DEBUG=1 adds the traceback; bugs keep theirs). Ctrl-C prints
"interrupted" and exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

from llada_jax.decode.settings import ALGORITHMS, MODES
from llada_jax.errors import InputError, run_main
from llada_jax.llm import DEFAULT_CHECKPOINT  # the embedded model

# --check-finite is on by default when the weight files are smaller than this.
CHECK_FINITE_AUTO_BYTES = 2 * 1024**3


class UsageError(InputError):
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
  p.add_argument("--max-iterations", type=int, default=None,
                 help="the decode loop's iteration budget (0: the default); rows that reach it "
                 "end with finish 'budget' and a warning")
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
  p.add_argument("--sampler-impl", default="logits",
                 help="logits (full [B, W, V] logits) | fused (LM head over vocabulary tiles "
                 "in the sampler: same tokens, less memory traffic) | pallas | pallas_tpu "
                 "(greedy kernel, one device)")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  p.add_argument("--batch-invariant", action="store_true",
                 help="run rows one at a time (bitwise independent of the batch)")
  p.add_argument("--stream", action="store_true", help="print each block as it is committed")
  p.add_argument("--format", default="text", choices=["text", "json"])
  p.add_argument("--timing", action="store_true",
                 help="decode a second time and report the run time without compilation")
  _bool_flag(p, "check-finite", "check every weight for NaN/inf after loading (default: on "
             f"when the weight files total under {CHECK_FINITE_AUTO_BYTES >> 30} GiB)")
  p.add_argument("--debug", action="store_true",
                 help="print the traceback of errors (also: LLADA_JAX_DEBUG=1)")
  from llada_jax import compile_cache  # noqa: PLC0415
  compile_cache.add_flag(p)
  return p


def _settings_overrides(args) -> dict:
  keys = ("algorithm", "gen_length", "block_length", "threshold", "editing_threshold",
          "max_post_steps", "num_to_transfer", "steps", "temperature", "top_k", "top_p", "seed",
          "eos_id", "mask_id", "eos_early_stop", "mbe_window", "max_iterations")
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


def _check_impls(args) -> None:
  """Unknown --attention-impl / --moe-impl / --update-impl names, before the load ("auto" is
  resolved later, with the devices)."""
  from llada_jax.decode.update import get_sampler, get_update  # noqa: PLC0415
  from llada_jax.model.moe import expert_impl_names  # noqa: PLC0415
  from llada_jax.model.transformer import get_attention  # noqa: PLC0415
  if args.attention_impl != "auto":
    get_attention(args.attention_impl)
  if args.moe_impl != "auto" and args.moe_impl not in expert_impl_names():
    raise UsageError(f"unknown --moe-impl {args.moe_impl!r}; choose from auto, "
                     f"{', '.join(expert_impl_names())}")
  get_update(args.update_impl)
  get_sampler(args.sampler_impl)


def _weight_files(ckpt: str) -> list[str]:
  """The checkpoint's safetensors files, each checked to be a readable safetensors file (its
  header is parsed and must cover the whole file: catches empty, truncated and random files)."""
  from safetensors import SafetensorError, safe_open  # noqa: PLC0415
  single = os.path.join(ckpt, "model.safetensors")
  index = os.path.join(ckpt, "model.safetensors.index.json")
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted({os.path.join(ckpt, v) for v in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError):
      return []  # the loader reports a malformed index in one line
  else:
    raise InputError(f"no weights in checkpoint {ckpt}: neither model.safetensors nor "
                     "model.safetensors.index.json exists")
  for file in files:
    if not os.path.exists(file):
      continue  # the loader names every missing shard at once
    try:
      with safe_open(file, framework="numpy") as f:
        f.keys()
    except SafetensorError as e:
      raise InputError(f"{file} is not a readable safetensors file, it may be truncated or "
                       f"corrupt ({e})") from None
  return files


def _check_finite(weight_files: list[str]) -> None:
  """Raises one `InputError` naming the first tensor (in file order) holding NaN or inf. Reads
  each tensor once on the host, one at a time, before the load (the files are then in the page
  cache for it)."""
  import numpy as np  # noqa: PLC0415
  from safetensors import safe_open  # noqa: PLC0415
  for file in weight_files:
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        x = f.get_tensor(name)
        if np.isfinite(x).all():
          continue
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
        raise InputError(f"non-finite weights in {os.path.dirname(file)}: {name} holds {what} "
                         f"of {x.size} values (--no-check-finite skips this check)")


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
  from llada_jax.config import ModelConfig
  from llada_jax.decode.api import _check_prompts
  from llada_jax.decode.settings import DecodeSettings
  from llada_jax.tokenizer import Tokenizer
  # Validate settings, the mesh spec, the config, the weight files' headers, the tokenizer and
  # the prompts before the (slow) checkpoint load and any compilation.
  settings = DecodeSettings.for_mode(args.mode, **_settings_overrides(args))
  block_length = settings.block_length
  mesh_spec = _mesh_spec(args.mesh)
  if args.checkpoint is not None:  # a directory, or a hub id downloaded on first use
    from llada_jax.checkpoint import resolve_checkpoint  # noqa: PLC0415
    ckpt = resolve_checkpoint(args.checkpoint)
  _check_impls(args)
  model_config = ModelConfig.from_json_file(ckpt)
  settings = settings.with_ids(model_config.eos_token_id, model_config.mask_token_id)
  settings.validate(model_config.vocab_size)
  weight_files = _weight_files(ckpt)
  check_finite = args.check_finite
  if check_finite is None:
    check_finite = sum(os.path.getsize(f) for f in weight_files
                       if os.path.exists(f)) < CHECK_FINITE_AUTO_BYTES

  tokenizer = None
  if os.path.exists(os.path.join(ckpt, "tokenizer.json")):
    tokenizer = Tokenizer.from_dir(ckpt)
  chat = args.chat
  if chat is None:
    chat = args.checkpoint is not None and bool(tokenizer and tokenizer.chat_template)
  if chat and tokenizer is not None and not tokenizer.chat_template:
    raise UsageError(f"--chat: the tokenizer in {ckpt} has no chat template")
  if chat and args.prompt and tokenizer is not None:
    tokenizer.check_chat_template()
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
  _check_prompts(prompts, model_config, settings)  # token ids and context length
  if check_finite:
    _check_finite([f for f in weight_files if os.path.exists(f)])  # the loader names missing ones

  from llada_jax import compile_cache  # noqa: PLC0415
  compile_cache.enable(args.compilation_cache)
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
      update_impl=args.update_impl, sampler_impl=args.sampler_impl, moe_impl=args.moe_impl,
      mesh=mesh,
      batch_invariant=args.batch_invariant, on_block=on_block, **_settings_overrides(args))
  from llada_jax.decode.api import BudgetWarning  # noqa: PLC0415
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", BudgetWarning)  # reported below, once, in the CLI's words
    result = decode()
  seconds = time.perf_counter() - t0
  timing = dict(load_seconds=round(load_seconds, 3), seconds=round(seconds, 3))
  if args.timing:  # the same decode again: the compiled program's run time alone
    t0 = time.perf_counter()
    decode()
    run_seconds = time.perf_counter() - t0
    steps = max(result.nfe) + result.commits
    timing.update(run_seconds=float(f"{run_seconds:.4g}"),
                  seconds_per_forward=float(f"{run_seconds / max(steps, 1):.4g}"))
  rows = []
  for i, ids in enumerate(result.output_ids):
    row = dict(prompt_ids=prompts[i], output_ids=ids, nfe=result.nfe[i], tpf=result.tpf[i],
               fills=result.fills[i], edits=result.edits[i], finish=result.finish[i])
    if tokenizer is not None:
      row["text"] = tokenizer.decode(ids)
    rows.append(row)
  unfinished = [i for i, f in enumerate(result.finish) if f == "budget"]
  if unfinished:
    print(f"warning: row(s) {unfinished} stopped unfinished (finish 'budget'): mask id "
          f"{result.settings.mask_id} left in the output because the model samples its own "
          "mask token; raise --max-iterations (or --steps for llada2.0)", file=sys.stderr)
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
            f"finish {row['finish']}, mode {args.mode}, {seconds:.1f}s (incl. compile)")
    if args.timing:
      print(f"-- load {load_seconds:.1f}s, decode {timing['run_seconds']:.2f}s without "
            f"compilation, {1e3 * timing['seconds_per_forward']:.1f} ms per forward")
  return 0


def main(argv=None) -> int:
  """The CLI inside the error boundary: a bad input is one line and status 2, Ctrl-C
  "interrupted" and status 130, a bug its traceback (`llada_jax.errors.run_main`)."""
  return run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
