"""The decode CLI on a mesh of 8 fake CPU devices, run as a subprocess by
`test_decode_cli_mesh.py`:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/decode_cli_mesh_worker.py \
      MESH ATTENTION_IMPL [EXTRA CLI FLAGS...]

Runs `python -m llada_jax.decode` (its `main`, in this process) for every fixture `generate()`
run of both fixture sets with `--mesh MESH --attention-impl ATTENTION_IMPL --format json`, and
prints one JSON object (the last stdout line): per run, whether tokens and NFE equal the
fixture's, and the mesh the CLI reported. With `--engine` among the extra flags it also serves
every fixture run through the continuous-batching engine on the same mesh (all runs of one
fixture set and algorithm submitted at once to 4 slots) and reports tokens and NFE under
"engine|...".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from conftest import FIXTURE_NAMES, expected_output, golden, run_kwargs  # noqa: E402
from test_cli import _flags  # noqa: E402

from llada_jax.decode.__main__ import main  # noqa: E402


def run_all(mesh: str, attention_impl: str, extra: list[str]) -> dict:
  res = {}
  for name in FIXTURE_NAMES:
    g = golden(name)
    for run in g.runs():
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        rc = main(_flags(g, run) + ["--mesh", mesh, "--attention-impl", attention_impl, *extra])
      rec = json.loads(out.getvalue()) if rc == 0 else {}
      res[f"{name}|{run['name']}"] = dict(
          rc=rc, tokens=rec.get("output_ids") == expected_output(g, run),
          nfe=rec.get("nfe") == run["nfe"], mesh=rec.get("mesh"))
  return res


def engine_all(mesh: str, attention_impl: str) -> dict:
  from llada_jax.decode.settings import DecodeSettings  # noqa: PLC0415
  from llada_jax.serve.engine import Engine, Request  # noqa: PLC0415
  res = {}
  for name in FIXTURE_NAMES:
    g = golden(name)
    for algorithm in ("llada2.1", "llada2.0"):
      runs = [r for r in g.runs() if run_kwargs(g, r)["algorithm"] == algorithm]
      settings = [DecodeSettings(**run_kwargs(g, r)) for r in runs]
      longest = max(s.gen_length for s in settings)
      engine = Engine(g.params, g.config, settings=settings[0], slots=4, chunk=8, mesh=mesh,
                      max_length=len(g.prompt) + longest + 2 * settings[0].block_length,
                      attention_impl=attention_impl)
      done = {}
      for run, s in zip(runs, settings):
        engine.submit(Request(prompt_ids=g.prompt, settings=s,
                              on_done=lambda r, n=run["name"]: done.__setitem__(n, r)))
      while len(done) < len(runs):
        engine.step()
      for run in runs:
        r = done[run["name"]]
        res[f"engine|{name}|{run['name']}"] = dict(
            tokens=r.output_ids == expected_output(g, run), nfe=r.nfe == run["nfe"],
            admitted=engine.stats["admitted"])
  return res


if __name__ == "__main__":
  extra = [a for a in sys.argv[3:] if a != "--engine"]
  out = run_all(sys.argv[1], sys.argv[2], extra)
  if "--engine" in sys.argv[3:]:
    out.update(engine_all(sys.argv[1], sys.argv[2]))
  print(json.dumps(out))
