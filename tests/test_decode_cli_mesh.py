"""Pod inference from the CLI: `python -m llada_jax.decode --mesh ...` on 8 fake CPU devices
reproduces every fixture `generate()` run (tokens and NFE) of both fixture sets."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from conftest import FIXTURE_NAMES, golden  # noqa: E402
from parallel_checks import FAST_COMPILE  # noqa: E402


def _run(mesh: str, attention_impl: str, extra: tuple = ()) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  p = subprocess.run([sys.executable, os.path.join(HERE, "decode_cli_mesh_worker.py"), mesh,
                      attention_impl, *extra], capture_output=True, text=True, timeout=900, env=env,
                     cwd=ROOT)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh, attention_impl, extra, shape", [
    ("data=2,expert=4", "pallas", (), dict(data=2, fsdp=1, expert=4, tensor=1)),
    # ... and the serving engine (continuous batching) on the same mesh
    ("auto", "xla", ("--engine",), dict(data=1, fsdp=1, expert=8, tensor=1)),
    # the fused sampler with the vocabulary (LM head) sharded over `tensor`
    ("fsdp=2,expert=2,tensor=2", "xla", ("--sampler-impl", "fused"),
     dict(data=1, fsdp=2, expert=2, tensor=2)),
])
def test_cli_on_a_mesh_reproduces_every_fixture_run(mesh, attention_impl, extra, shape):
  res = _run(mesh, attention_impl, extra)
  engine = {k: v for k, v in res.items() if k.startswith("engine|")}
  res = {k: v for k, v in res.items() if not k.startswith("engine|")}
  runs = sum(len(golden(n).runs()) for n in FIXTURE_NAMES)
  assert len(res) == runs
  for case, r in res.items():
    assert r == dict(rc=0, tokens=True, nfe=True, mesh=shape), (case, r)
  if "--engine" in extra:
    assert len(engine) == runs
    for case, r in engine.items():
      assert r["tokens"] and r["nfe"], (case, r)
