"""What `mesh=` means in the public API: "auto" (the planner's choice), specs, None, and the
MoE implementation that goes with a mesh (one device here; the 8-device runs are in
`test_decode_cli_mesh.py` and `test_parallel_sharded.py`)."""

import pytest

import llada_jax
from llada_jax import parallel
from llada_jax.parallel import expert_parallel as ep_lib
from llada_jax.parallel.memory import GiB, HBM, plan

WORK = parallel.Workload(batch=1, prompt=256, gen=256, block_length=32)


def test_auto_mesh_prefers_experts_then_data():
  c = llada_jax.tiny_config()  # 8 experts
  assert parallel.auto_mesh_shape(c, 8) == dict(data=1, fsdp=1, expert=8, tensor=1)
  assert parallel.auto_mesh_shape(c, 16) == dict(data=2, fsdp=1, expert=8, tensor=1)
  assert parallel.auto_mesh_shape(c, 6) == dict(data=3, fsdp=1, expert=2, tensor=1)


def test_auto_mesh_moves_to_fsdp_when_the_memory_needs_it():
  c = llada_jax.tiny_config(num_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1)
  replicated = plan(c, dict(data=4, fsdp=1, expert=2, tensor=1), WORK)["inference"]
  fsdp4 = plan(c, dict(data=1, fsdp=4, expert=2, tensor=1), WORK)["inference"]
  assert fsdp4 < replicated
  hbm = int(fsdp4 / 0.9) + 1  # fits only when the dense weights are split four ways
  shape = parallel.auto_mesh_shape(c, 8, hbm_bytes=hbm, workload=WORK)
  assert shape["expert"] == 2 and shape["fsdp"] * shape["tensor"] > 1
  assert plan(c, shape, WORK)["inference"] <= 0.9 * hbm
  with pytest.raises(ValueError, match="does not fit on 8 devices"):
    parallel.auto_mesh_shape(c, 8, hbm_bytes=1000, workload=WORK)


def test_auto_mesh_of_the_real_models():
  mini = llada_jax.get_preset("llada2_1_mini")
  flash = llada_jax.get_preset("llada2_1_flash")
  assert parallel.auto_mesh_shape(mini, 8, hbm_bytes=HBM["v6e"], workload=WORK)["expert"] == 8
  shape = parallel.auto_mesh_shape(flash, 64, hbm_bytes=HBM["v5e"], workload=WORK)
  assert shape["expert"] == 64
  assert plan(flash, shape, WORK)["inference"] <= 0.9 * HBM["v5e"]
  assert plan(flash, shape, WORK)["params"] > 2 * GiB  # a real model, not a toy


def test_resolve_mesh_on_one_device():
  c = llada_jax.tiny_config()
  assert parallel.resolve_mesh(None, c) is None
  assert parallel.resolve_mesh("auto", c) is None  # one device: no mesh
  m = parallel.resolve_mesh("data=1", c)
  assert dict(m.shape) == dict(data=1, fsdp=1, expert=1, tensor=1)
  assert parallel.resolve_mesh(m, c) is m
  with pytest.raises(ValueError, match="needs 8 devices, have 1"):
    parallel.resolve_mesh("data=2,expert=4", c)
  with pytest.raises(ValueError, match="unknown axis"):
    parallel.resolve_mesh("dat=2", c)


def test_moe_impl_for_a_mesh():
  m = parallel.make_mesh("data=1")
  assert parallel.resolve_moe_impl("auto", None) == "auto_local"  # CPU: per-shape choice
  assert parallel.resolve_moe_impl("auto", m) == "ep_einsum"  # CPU: dense all_to_all, dropless
  assert parallel.resolve_moe_impl("dense", m) == "dense"
  dropping = ep_lib.EPConfig(capacity_factor=1.25)
  assert parallel.resolve_moe_impl(dropping, m).startswith("ep_")  # training may drop
  with pytest.raises(ValueError, match="decoding needs a dropless MoE dispatch"):
    parallel.resolve_moe_impl(dropping, m, dropless=True)


def test_generate_refuses_a_dropping_dispatch(tiny):
  with pytest.raises(ValueError, match="dropless"):
    llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], gen_length=8, block_length=8,
                       mesh="data=1", moe_impl=ep_lib.EPConfig(capacity_factor=1.0))


def test_generate_and_forward_on_a_one_device_mesh_match(tiny):
  kw = dict(gen_length=8, block_length=8)
  a = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], **kw)
  b = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], mesh="data=1", **kw)
  assert a.output_ids == b.output_ids and a.nfe == b.nfe
