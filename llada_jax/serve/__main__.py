"""`python -m llada_jax.serve`: an OpenAI-compatible server with continuous batching.

    python -m llada_jax.serve [--checkpoint DIR_OR_HUB_ID] [--mesh auto] [--port 8000]
        [--slots 8] [--max-length 2048] [--mode quality] [--block-length 32]

Then `curl localhost:8000/v1/completions -d '{"prompt": "def f(x):", "max_tokens": 64}'`, the
`openai` client with `base_url="http://localhost:8000/v1"`, or the playground at
http://localhost:8000/. Bad flags are one line and exit status 2 before the model loads;
SIGTERM / Ctrl-C stop taking requests and give in-flight ones `--drain-seconds` to finish.
"""

from __future__ import annotations

import argparse
import os
import sys

from llada_jax.errors import InputError, run_main


class UsageError(InputError):
  pass


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  from llada_jax import compile_cache  # noqa: PLC0415
  p = _Parser(prog="python -m llada_jax.serve", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", default=None,
                 help="HF checkpoint directory or hub id (default: the embedded model)")
  p.add_argument("--model-name", default=None, help="the model id clients use (default: the "
                 "checkpoint's name)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--mesh", default=None, help="'auto', 'none' or sizes such as data=2,expert=4")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  p.add_argument("--slots", type=int, default=8, help="rows decoded together")
  p.add_argument("--max-length", type=int, default=None,
                 help="prompt + generated tokens per request (default: the model's, <= 4096)")
  p.add_argument("--chunk", type=int, default=8,
                 help="decode iterations between reports (stream granularity)")
  p.add_argument("--mode", default="quality", help="default mode of requests")
  p.add_argument("--block-length", type=int, default=None)
  p.add_argument("--mbe-window", type=int, default=None)
  p.add_argument("--algorithm", default=None)
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--max-tokens", type=int, default=128, help="default max_tokens of requests")
  p.add_argument("--attention-impl", default="auto")
  p.add_argument("--moe-impl", default="auto")
  p.add_argument("--drain-seconds", type=float, default=30.0,
                 help="on shutdown, how long in-flight requests may still run")
  p.add_argument("--no-warmup", dest="warmup", action="store_false",
                 help="do not compile the decode programs before serving")
  compile_cache.add_flag(p)
  p.add_argument("--debug", action="store_true", help="tracebacks of errors")
  return p


def _fixed_settings(args) -> dict:
  keys = ("block_length", "mbe_window", "algorithm", "temperature", "top_k", "top_p")
  return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def prepare(args):
  """(llm, engine, server) from parsed flags: every check before the load, then the load."""
  from llada_jax import compile_cache  # noqa: PLC0415
  from llada_jax.decode.settings import MODES, DecodeSettings  # noqa: PLC0415
  if args.mode not in MODES:
    raise UsageError(f"unknown --mode {args.mode!r}; choose from {', '.join(MODES)}")
  if not 0 < args.port < 65536:
    raise UsageError(f"--port must be in 1..65535, got {args.port}")
  for name in ("slots", "chunk", "max_tokens"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  DecodeSettings.for_mode(args.mode, gen_length=args.max_tokens, **_fixed_settings(args))
  mesh = None if (args.mesh or "").strip().lower() in ("", "none") else args.mesh
  if mesh not in (None, "auto"):
    from llada_jax import parallel  # noqa: PLC0415
    parallel.parse_mesh_spec(mesh)
    parallel.fake_cpu_devices(mesh)
  compile_cache.enable(args.compilation_cache)
  from llada_jax.llm import LLM  # noqa: PLC0415
  from llada_jax.serve.app import Server  # noqa: PLC0415
  llm = LLM(args.checkpoint, mesh=mesh, dtype=args.dtype, attention_impl=args.attention_impl,
            moe_impl=args.moe_impl)
  engine = llm.engine(slots=args.slots, max_length=args.max_length, chunk=args.chunk,
                      mode=args.mode, **_fixed_settings(args))
  if args.max_tokens + 1 > engine.max_length:
    raise UsageError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in "
                     f"--max-length {engine.max_length}")
  name = args.model_name or (os.path.basename(os.path.normpath(args.checkpoint))
                             if args.checkpoint else "llada-default")
  return llm, engine, Server(llm, engine, model_id=name, default_max_tokens=args.max_tokens,
                             default_mode=args.mode)


def warmup(server) -> None:
  """Compiles the engine's programs before serving: one short request per prompt bucket
  (`llada_jax.decode.api.prompt_bucket`) up to the max length, so that no first request of a
  bucket stalls the others while its admission compiles."""
  import dataclasses  # noqa: PLC0415
  from llada_jax.decode.api import prompt_bucket  # noqa: PLC0415
  from llada_jax.serve.engine import Request  # noqa: PLC0415
  e = server.engine
  bl = e.settings.block_length
  # Prompts of 1 .. (max_length - bl) // bl blocks (room for one generated block); the engine
  # caps a bucket at the max length, as here.
  buckets = {n * bl: min(prompt_bucket(n * bl, bl), e.max_length)
             for n in range(1, (e.max_length - bl) // bl + 1)}
  sizes = sorted({b: p for p, b in buckets.items()}.values())  # one prompt per bucket
  done = []
  for size in sizes:
    e.submit(Request(prompt_ids=[0] * size, settings=dataclasses.replace(
        e.settings, gen_length=bl), on_done=done.append))
  while len(done) < len(sizes):
    e.step()


def run(argv=None) -> int:
  args = build_parser().parse_args(argv)
  llm, engine, server = prepare(args)
  if args.warmup:
    warmup(server)
  import uvicorn  # noqa: PLC0415
  from llada_jax.serve.app import build_app  # noqa: PLC0415
  app = build_app(server, drain_seconds=args.drain_seconds)
  print(f"serving {server.model_id} on http://{args.host}:{args.port} ({engine.slots} slots, "
        f"max length {engine.max_length}, block {engine.settings.block_length}, mesh "
        f"{'none' if engine.mesh is None else dict(engine.mesh.shape)})", file=sys.stderr,
        flush=True)
  # uvicorn drains on SIGTERM, then re-raises it to the handler it found: a no-op here, so a
  # drained shutdown exits 0 (Ctrl-C still ends as an interrupt, status 130).
  import signal  # noqa: PLC0415
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
              timeout_graceful_shutdown=max(1, int(args.drain_seconds)))
  print("server stopped", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  return run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
