"""The decode CLI on a mesh of 8 fake CPU devices, run as a subprocess by
`test_decode_cli_mesh.py`:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/decode_cli_mesh_worker.py \
      MESH ATTENTION_IMPL [EXTRA CLI FLAGS...]

Runs `python -m llada_jax.decode` (its `main`, in this process) for every fixture `generate()`
run of both fixture sets with `--mesh MESH --attention-impl ATTENTION_IMPL --format json`, and
prints one JSON object (the last stdout line): per run, whether tokens and NFE equal the
fixture's, and the mesh the CLI reported.
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

from conftest import FIXTURE_NAMES, expected_output, golden  # noqa: E402
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


if __name__ == "__main__":
  print(json.dumps(run_all(sys.argv[1], sys.argv[2], sys.argv[3:])))
