"""TPU pod lowering on an AbstractMesh (`tools/export_tpu.py`) and the memory planner
(`tools/plan_memory.py`), on this CPU host."""

import os
import re
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
  assert "per device 3.40 GiB" in out
  assert "forward (batch 8 x 1024 tokens): lowered for tpu x 64 devices" in out
  assert "decode (batch 8, prompt 64, gen 64, block 32): lowered for tpu x 64 devices" in out
  assert "ragged_all_to_all 2" in out
  assert {"decode.mlir", "forward.mlir"} <= set(os.listdir(tmp_path))


TINY_4 = ["--config", "tiny", "--mesh", "fsdp=2,expert=2", "--devices", "4",
          "--attention-impl", "pallas_tpu"]


def _check_lines(out: str) -> dict:
  """{program: (tpu_custom_call, all_to_all, ragged_all_to_all)} from the tool's check lines."""
  pat = (r"  (\w+): Mosaic kernels \(tpu_custom_call\) (\d+); EP collectives: all_to_all (\d+), "
         r"ragged_all_to_all (\d+)")
  return {m[0]: tuple(map(int, m[1:])) for m in re.findall(pat, out)}


def test_export_tool_counts_kernels_and_ep_collectives(capsys):
  """The sharded Pallas attention and the ragged EP dispatch are in every tiny program."""
  assert export_tpu.main(TINY_4 + ["--seq", "512", "--prompt", "64", "--gen", "64"]) == 0
  counts = _check_lines(capsys.readouterr().out)
  assert set(counts) == {"forward", "decode", "train"}
  for w, (kernels, a2a, ragged) in counts.items():
    assert kernels > 0 and ragged > 0, (w, counts)
  assert counts["forward"][0] == 2  # one kernel per layer stack (dense, moe)
  assert counts["train"][0] == 8  # forward, remat forward, dq and dkv per stack


@pytest.fixture
def fresh_traces():
  """Monkeypatched registries change what a name lowers to: no cached trace may leak."""
  jax.clear_caches()
  yield
  jax.clear_caches()


def test_export_tool_fails_when_the_kernel_is_absent(monkeypatch, capsys, fresh_traces):
  import llada_jax.kernels  # noqa: F401  (registers "pallas_tpu" before it is replaced)
  from llada_jax.model import transformer
  monkeypatch.setitem(transformer.ATTENTION_IMPLS, "pallas_tpu", transformer.xla_attention)
  assert export_tpu.main(TINY_4 + ["--what", "forward", "--batch", "4", "--seq", "96"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["forward: missing: tpu_custom_call (requested by attention_impl pallas_tpu)"]


def test_export_tool_fails_when_the_ep_path_is_absent(monkeypatch, capsys, fresh_traces):
  """"ep_ragged" replaced by a local (no exchange) implementation: ragged_all_to_all missing."""
  from llada_jax.model import moe
  from llada_jax.parallel import expert_parallel  # noqa: F401  (registers "ep_ragged")

  def local(x, idx, w, gate, up, down):
    y = jnp.einsum("nkd,nk->nd", moe.experts_ragged(x, idx, gate, up, down), w)
    return y, {"tokens_per_expert": jnp.zeros((gate.shape[0],), jnp.int32),
               "dropped": jnp.zeros((), jnp.int32)}
  monkeypatch.setitem(moe.COMBINED_EXPERT_IMPLS, "ep_ragged", local)
  assert export_tpu.main(TINY_4 + ["--what", "forward", "--batch", "4", "--seq", "80",
                                   "--moe-impl", "ep_ragged"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["forward: missing: ragged_all_to_all (requested by moe_impl ep_ragged "
                 "(ragged dispatch))"]


def test_export_tool_requirements():
  c = tiny_config()
  mesh = parallel.make_abstract_mesh("fsdp=2,expert=2")
  rules = parallel.normalize_rules()
  assert export_tpu.requirements(c, mesh, rules, "pallas_tpu", "ep") == {
      "tpu_custom_call": "attention_impl pallas_tpu", "all_to_all": "moe_impl ep (dense dispatch)"}
  assert export_tpu.requirements(c, mesh, rules, "xla", "ragged") == {}
  # experts not split over any axis: EP exchanges nothing, nothing is required
  assert export_tpu.requirements(c, parallel.make_abstract_mesh("data=4"), rules, "xla",
                                 "ep_ragged") == {}


@pytest.mark.parametrize("config, mesh, devices", [
    ("llada2_1_mini", "fsdp=2,expert=2,tensor=2", 8),
    ("llada2_1_flash", "fsdp=4,expert=16,tensor=4", 256)])
def test_export_tool_big_configs_with_pallas_attention(capsys, config, mesh, devices):
  """Full-size forward and decode programs (~5 s each to lower) hold the Mosaic kernels and
  the ragged EP exchange."""
  assert export_tpu.main(["--config", config, "--mesh", mesh, "--what", "forward,decode",
                          "--attention-impl", "pallas_tpu"]) == 0
  out = capsys.readouterr().out
  assert f"({devices} devices), moe_impl ep_ragged" in out
  counts = _check_lines(out)
  assert counts["forward"] == (2, 1, 2) and counts["decode"][0] > 0 and counts["decode"][2] > 0


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
