"""TPU pod lowering on an AbstractMesh (`tools/export_tpu.py`) and the memory planner
(`tools/plan_memory.py`), on this CPU host."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from llada_jax import parallel
from llada_jax.config import tiny_config
from llada_jax.model.transformer import _forward_jit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import export_tpu  # noqa: E402
import plan_memory  # noqa: E402


@pytest.mark.parametrize("impl, collective", [("ep", "stablehlo.all_to_all"),
                                              ("ep_ragged", "@ragged_all_to_all(")])
def test_tiny_forward_lowers_for_tpu_with_expert_parallelism(impl, collective):
  c = tiny_config()
  mesh = parallel.make_abstract_mesh("data=2,fsdp=2,expert=4,tensor=4")
  ids = jax.ShapeDtypeStruct((8, 32), jnp.int32,
                             sharding=parallel.activation_sharding("tokens", (8, 32), mesh))
  exp, _ = export_tpu.export(_forward_jit, (parallel.sharded_param_shapes(c, mesh), c, ids, ids),
                             dict(block_length=8, attention_impl="xla", moe_impl=impl,
                                  collect=False), mesh)
  assert exp.platforms == ("tpu",) and exp.nr_devices == 64
  assert collective in exp.mlir_module()
  leaves = jax.tree_util.tree_leaves(parallel.sharded_param_shapes(c, mesh))
  assert len(exp.in_shardings_hlo) == len(leaves) + 2


def test_export_tool_flash_64_devices(capsys, tmp_path):
  """The full-size LLaDA2.1-flash forward and decode loop lower for a 64-device TPU mesh."""
  assert export_tpu.main(["--config", "llada2_1_flash", "--mesh", "fsdp=2,expert=8,tensor=4",
                          "--what", "forward,decode", "--batch", "8", "--seq", "1024",
                          "--prompt", "64", "--gen", "64", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "(64 devices), moe_impl ep_ragged" in out
  assert "per device 3.67 GiB" in out
  assert "forward (batch 8 x 1024 tokens): lowered for tpu x 64 devices" in out
  assert "decode (batch 8, prompt 64, gen 64, block 32): lowered for tpu x 64 devices" in out
  assert "ragged_all_to_all 2" in out
  assert {"decode.mlir", "forward.mlir"} <= set(os.listdir(tmp_path))


def test_export_tool_errors(capsys):
  assert export_tpu.main(["--config", "tiny", "--mesh", "data=2,pipe=2"]) == 2
  assert "unknown axis 'pipe'" in capsys.readouterr().err
  assert export_tpu.main(["--config", "tiny", "--mesh", "data=2", "--what", "fwd"]) == 2
  assert "unknown program 'fwd'" in capsys.readouterr().err


def test_plan_memory_tool(capsys):
  assert plan_memory.main(["--config", "llada2_1_flash", "--mesh",
                           "fsdp=4,expert=16,tensor=4"]) == 0
  out = capsys.readouterr().out
  assert "(256 devices)" in out
  lines = {line.split("  ")[0]: line for line in out.splitlines()}
  assert "fits" in lines["inference (decode)"]
  assert "NO" in lines["train, no remat"]
  assert plan_memory.main(["--config", "llada2_1_flash", "--mesh", "data=3"]) == 0
  assert plan_memory.main(["--config", "nope", "--mesh", "data=2"]) == 2
