"""Load benchmark of the OpenAI-compatible server (continuous batching) against one request at a
time.

  python tools/bench_serve.py [--checkpoint DIR] [--requests 32] [--slots 8]
      [--concurrency 1,4,16] [--max-tokens 64] [--mode quality]

Starts the server in this process (uvicorn in a thread, the embedded model by default), warms
every program up, then for each concurrency level sends `--requests` completion requests (prompts
cycled from a fixed list, `--max-tokens` each) from that many client threads and reports
requests/s, generated tokens/s and the p50/p99 latency. The baseline decodes the same requests
one after the other with `LLM.generate` (one compiled loop per request, no server). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, x):",
           "for i in range(10):", "def add(a, b):\n    return", "x = [1, 2, 3]\n",
           "# sort a list\n", "while True:", "def is_prime(n):", "with open(path) as f:",
           "try:\n    import numpy", "def main():\n    args ="]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _row(name, latencies, tokens, seconds) -> str:
  lat = np.asarray(latencies)
  return (f"| {name} | {len(lat) / seconds:.2f} | {tokens / seconds:.1f} | "
          f"{np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} |")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--requests", type=int, default=32)
  ap.add_argument("--slots", type=int, default=8)
  ap.add_argument("--concurrency", default="1,4,16")
  ap.add_argument("--max-tokens", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=256)
  ap.add_argument("--chunk", type=int, default=8)
  ap.add_argument("--mode", default="quality")
  args = ap.parse_args(argv)
  levels = [int(x) for x in args.concurrency.split(",")]

  import httpx
  import uvicorn

  import llada_jax
  from llada_jax.serve.app import Server, build_app
  llm = llada_jax.LLM(args.checkpoint)
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

  # baseline: one request at a time, no server (programs compiled first)
  for p in sorted(set(prompts)):
    llm.generate(p, mode=args.mode, gen_length=args.max_tokens)
  lat, toks = [], 0
  t0 = time.perf_counter()
  for p in prompts:
    t = time.perf_counter()
    toks += len(llm.generate(p, mode=args.mode, gen_length=args.max_tokens)[0].token_ids)
    lat.append(time.perf_counter() - t)
  rows = [_row("one at a time (`LLM.generate`, no server)", lat, toks,
               time.perf_counter() - t0)]

  engine = llm.engine(slots=args.slots, max_length=args.max_length, chunk=args.chunk,
                      mode=args.mode)
  server = Server(llm, engine, model_id="bench", default_max_tokens=args.max_tokens)
  port = _free_port()
  userver = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port,
                                          log_level="warning"))
  thread = threading.Thread(target=userver.run, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}/v1/completions"
  while True:
    try:
      httpx.get(f"http://127.0.0.1:{port}/health")
      break
    except httpx.TransportError:
      time.sleep(0.05)

  def one(prompt):
    t = time.perf_counter()
    r = httpx.post(url, json={"prompt": prompt, "max_tokens": args.max_tokens}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

  for p in sorted(set(prompts)):  # compile the admission program of every prompt bucket
    one(p)
  for c in levels:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
      results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - t0
    rows.append(_row(f"server, concurrency {c} ({args.slots} slots)", [r[0] for r in results],
                     sum(r[1] for r in results), seconds))
    print(rows[-1], file=sys.stderr, flush=True)
  userver.should_exit = True
  thread.join(timeout=60)
  print(f"\n{args.requests} requests, {args.max_tokens} max tokens, mode {args.mode}, "
        f"{llm.name}\n")
  print("| run | requests/s | tokens/s | p50 latency s | p99 latency s |")
  print("|---|---|---|---|---|")
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  from llada_jax.errors import run_main  # noqa: E402
  sys.exit(run_main(lambda argv: main([a for a in sys.argv[1:] if a != "--debug"]) or 0))
