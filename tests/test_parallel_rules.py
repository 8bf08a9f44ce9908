"""Meshes, sharding rules, expert-parallel config, multi-host settings (one process, one
device: abstract meshes carry the shapes)."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import llada_jax
from llada_jax import parallel
from llada_jax.config import get_preset
from llada_jax.model import moe as moe_lib
from llada_jax.parallel import distributed, memory


# ---- mesh specs ---------------------------------------------------------------------------------
def test_parse_mesh_spec():
  assert parallel.parse_mesh_spec("data=2,expert=4") == dict(data=2, fsdp=1, expert=4, tensor=1)
  assert parallel.parse_mesh_spec(" tensor=2 , fsdp=-1 ") == dict(data=1, fsdp=-1, expert=1,
                                                                  tensor=2)
  assert parallel.parse_mesh_spec("") == parallel.parse_mesh_spec(None) == dict(
      data=1, fsdp=1, expert=1, tensor=1)
  assert parallel.parse_mesh_spec({"expert": 8})["expert"] == 8
  assert parallel.resolve_mesh_shape("expert=4,data=-1", 64)["data"] == 16
  assert parallel.format_mesh_shape(parallel.parse_mesh_spec("expert=4,data=2")) == (
      "data=2,expert=4")


@pytest.mark.parametrize("spec, msg", [
    ("data=2,pipe=2", "unknown axis 'pipe'"), ("data", "not NAME=SIZE"),
    ("data=x", "not an integer"), ("data=0", "positive"), ("data=2,data=2", "given twice"),
    ("data=-1,fsdp=-1", "at most one axis"),
])
def test_parse_mesh_spec_errors(spec, msg):
  with pytest.raises(ValueError, match=msg):
    parallel.parse_mesh_spec(spec)


def test_mesh_device_count_errors():
  with pytest.raises(ValueError, match="needs 8 devices, have 4"):
    parallel.resolve_mesh_shape("data=8", 4)
  with pytest.raises(ValueError, match="not a multiple of 3"):
    parallel.resolve_mesh_shape("data=-1,expert=3", 8)


def test_make_mesh_is_auto_with_all_axes():
  mesh = parallel.make_mesh("data=1", jax.devices()[:1])
  assert mesh.axis_names == parallel.AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  am = parallel.make_abstract_mesh("fsdp=4,expert=16,tensor=4")
  assert am.size == 256 and all(t == jax.sharding.AxisType.Auto for t in am.axis_types)


def test_parallel_config_roundtrip():
  cfg = parallel.parallel_config("data=2,expert=4", embed="fsdp,data", vocab=None)
  assert dict(cfg.mesh) == dict(data=2, fsdp=1, expert=4, tensor=1)
  rules = dict(parallel.normalize_rules(cfg.rules))
  assert rules["embed"] == ("fsdp", "data") and rules["vocab"] == () and rules["expert"] == (
      "expert",)
  cfg.moe.capacity_factor = 1.25
  ep = parallel.EPConfig.from_config(cfg)
  assert ep.capacity_factor == 1.25 and ep.rules == parallel.normalize_rules(cfg.rules)
  assert parallel.mesh_from_config(parallel.parallel_config("data=1"),
                                   jax.devices()[:1]).size == 1


# ---- rules --------------------------------------------------------------------------------------
def test_logical_to_spec_keeps_only_dividing_unused_axes():
  sizes = dict(data=2, fsdp=4, expert=8, tensor=4)
  rules = dict(batch=("data", "fsdp", "expert"), kv_heads=("tensor",))
  assert parallel.logical_to_spec(("batch", "length"), (16, 7), sizes, rules) == P(
      ("data", "fsdp"))  # 16 rows: data x fsdp = 8 divides, x expert does not
  assert parallel.logical_to_spec(("batch",), (3,), sizes, rules) == P()
  assert parallel.logical_to_spec(("kv_heads",), (2,), sizes, rules) == P()  # 2 % 4
  # an axis used by an earlier dimension is not reused
  assert parallel.logical_to_spec(("embed", "mlp"), (8, 8), sizes,
                                  dict(embed=("fsdp",), mlp=("fsdp", "tensor"))) == P(
                                      "fsdp", "tensor")
  # size-1 axes are left out
  assert parallel.logical_to_spec(("expert",), (8,), dict(data=8, fsdp=1, expert=1, tensor=1),
                                  None) == P()
  with pytest.raises(ValueError, match="no sharding rule for logical axis 'nope'"):
    parallel.logical_to_spec(("nope",), (4,), sizes, None)
  with pytest.raises(ValueError, match="no axis 'pipe'"):
    parallel.logical_to_spec(("embed",), (4,), sizes, dict(embed=("pipe",)))


def _check_divisible(shapes, specs, sizes):
  for s, spec in zip(jax.tree_util.tree_leaves(shapes),
                     jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    for dim, entry in zip(s.shape, tuple(spec)):
      axes = parallel.rules.spec_axes(entry)
      assert dim % np.prod([sizes[a] for a in axes], dtype=int) == 0


def test_flash_param_shardings_on_256_devices():
  c = get_preset("llada2_1_flash")
  mesh = parallel.make_abstract_mesh("fsdp=4,expert=16,tensor=4")
  specs = parallel.param_partition_specs(c, mesh)
  assert specs["moe"]["experts"]["gate"] == P(None, "expert", "fsdp", "tensor")
  assert specs["moe"]["experts"]["down"] == P(None, "expert", "tensor", "fsdp")
  # the vocabulary splits over tensor x expert (157,184 = 64 x 2,456): no whole LM head per chip
  assert specs["embed"] == P(("tensor", "expert"), "fsdp")
  assert specs["lm_head"] == P("fsdp", ("tensor", "expert"))
  assert specs["moe"]["attn"]["qkv"] == P(None, "fsdp", "tensor")
  assert specs["moe"]["router"]["weight"] == P(None, "fsdp")
  shapes = llada_jax.param_shapes(c)
  _check_divisible(shapes, specs, parallel.mesh_shape(mesh))
  per_device = parallel.param_bytes_per_device(c, mesh)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  assert total / 256 < per_device < total / 64  # the small replicated leaves cost a little
  sds = parallel.sharded_param_shapes(c, mesh)
  assert sds["moe"]["experts"]["up"].sharding.spec == P(None, "expert", "fsdp", "tensor")


def test_opt_state_sharded_like_params():
  c = llada_jax.tiny_config()
  mesh = parallel.make_abstract_mesh("fsdp=2,expert=2,tensor=2")
  ps = parallel.param_shardings(c, mesh)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  shapes = jax.eval_shape(opt.init, llada_jax.param_shapes(c))
  sh = parallel.opt_state_shardings(shapes, ps, mesh)
  adam = sh[1][0]
  assert adam.mu == ps and adam.nu == ps
  assert adam.count.spec == P()
  assert jax.tree_util.tree_structure(sh) == jax.tree_util.tree_structure(shapes)


def test_activation_specs():
  sizes = dict(data=2, fsdp=2, expert=2, tensor=2)
  assert parallel.activation_spec("tokens", (8, 16), sizes) == P(("data", "fsdp", "expert"))
  assert parallel.activation_spec("logits", (8, 16, 512), sizes) == P(
      ("data", "fsdp", "expert"), None, "tensor")
  assert parallel.activation_spec("kv_cache", (3, 4, 2, 32, 16), sizes) == P(
      None, ("data", "fsdp"), "tensor")
  with pytest.raises(ValueError, match="unknown activation kind"):
    parallel.activation_spec("nope", (1,), sizes)


def test_shard_params_on_one_device_is_identity(tiny):
  mesh = parallel.make_mesh("data=1", jax.devices()[:1])
  sp = parallel.shard_params(tiny.params, tiny.config, mesh)
  for a, b in zip(jax.tree_util.tree_leaves(sp), jax.tree_util.tree_leaves(tiny.params)):
    np.testing.assert_array_equal(a, b)
    assert isinstance(a.sharding, jax.sharding.NamedSharding)


# ---- expert parallelism (one device) ------------------------------------------------------------
def test_ep_config_validation_and_capacity():
  with pytest.raises(ValueError, match="dispatch 'x'"):
    parallel.EPConfig(dispatch="x")
  with pytest.raises(ValueError, match="gmm 'x'"):
    parallel.EPConfig(gmm="x")
  with pytest.raises(ValueError, match="capacity_factor must be >= 0"):
    parallel.EPConfig(capacity_factor=-1)
  with pytest.raises(ValueError, match="'einsum' needs the dense"):
    parallel.EPConfig(dispatch="ragged", gmm="einsum")
  assert parallel.capacity(16, 2, 8, 0.0) == 16  # worst case: every token on one expert
  assert parallel.capacity(16, 2, 8, 1.0) == 4
  assert parallel.capacity(16, 2, 8, 100.0) == 16
  cfg = parallel.EPConfig(capacity_factor=1.5)
  assert parallel.register_ep(cfg) == parallel.register_ep(parallel.EPConfig(capacity_factor=1.5))
  assert parallel.register_ep(cfg) != parallel.register_ep(parallel.EPConfig())


def test_ep_needs_a_mesh(tiny):
  p = jax.tree_util.tree_map(lambda a: a[0], tiny.params["moe"])
  x = jnp.ones((1, 4, tiny.config.hidden_size))
  with pytest.raises(ValueError, match="needs a mesh"):
    moe_lib.moe_block(p, x, tiny.config, impl="ep")


@pytest.mark.parametrize("impl", ["ep", "ep_ragged"])
def test_ep_on_one_device_equals_reference(tiny, impl):
  c = tiny.config
  p = jax.tree_util.tree_map(lambda a: a[0], tiny.params["moe"])
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, c.hidden_size))
  ref, _, idx, stats = moe_lib.moe_block(p, x, c, impl="ragged", return_stats=True)
  assert int(stats["tokens_per_expert"].sum()) == 16 * c.num_experts_per_tok
  with jax.set_mesh(parallel.make_mesh("data=1", jax.devices()[:1])):
    y, _, _, st = jax.jit(lambda p, x: moe_lib.moe_block(p, x, c, impl=impl,
                                                         return_stats=True))(p, x)
  np.testing.assert_allclose(y, ref, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(st["tokens_per_expert"], stats["tokens_per_expert"])
  assert int(st["dropped"]) == 0


# ---- multi-host settings ------------------------------------------------------------------------
def test_distributed_config_from_flags_and_env():
  p = distributed.add_flags(argparse.ArgumentParser())
  env = dict(LLADA_COORDINATOR_ADDRESS="10.0.0.1:1234", LLADA_NUM_PROCESSES="4",
             LLADA_PROCESS_ID="3")
  cfg = distributed.config_from(p.parse_args([]), env)
  assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.enabled) == (
      "10.0.0.1:1234", 4, 3, True)
  cfg = distributed.config_from(p.parse_args(["--process_id", "1"]), env)
  assert cfg.process_id == 1  # a flag wins over the environment
  cfg = distributed.config_from(None, dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2",
                                           JAX_PROCESS_ID="0"))
  assert cfg.enabled and cfg.num_processes == 2
  assert not distributed.config_from(None, {}).enabled
  assert not distributed.config_from(None, dict(env, LLADA_DISTRIBUTED="off")).enabled
  assert distributed.config_from(None, dict(LLADA_DISTRIBUTED="auto")).enabled
  assert distributed.initialize(distributed.config_from(None, {})) is False
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    distributed.config_from(None, dict(LLADA_COORDINATOR_ADDRESS="h:1"))
  with pytest.raises(ValueError, match="outside"):
    distributed.config_from(None, dict(env, LLADA_PROCESS_ID="4"))
  with pytest.raises(ValueError, match="not an integer"):
    distributed.config_from(None, dict(env, LLADA_NUM_PROCESSES="two"))


# ---- memory plan --------------------------------------------------------------------------------
def test_memory_plan_flash_256():
  c = get_preset("llada2_1_flash")
  mesh = parallel.make_abstract_mesh("fsdp=4,expert=16,tensor=4")
  w = memory.Workload()
  r = memory.plan(c, mesh, w)
  assert r["params"] == r["grads"] == parallel.param_bytes_per_device(c, mesh)
  specs = jax.tree_util.tree_leaves(parallel.param_partition_specs(c, mesh),
                                    is_leaf=lambda x: isinstance(x, P))
  n_local = sum(s.size // parallel.rules.shard_count(sp, mesh)
                for s, sp in zip(jax.tree_util.tree_leaves(llada_jax.param_shapes(c)), specs))
  assert r["optimizer"] == n_local * 4 * 2  # AdamW mu, nu in fp32
  assert r["activations_remat"] < r["activations_no_remat"]
  assert r["train_remat"] == 2 * r["params"] + r["optimizer"] + r["logits"] + (
      r["activations_remat"])
  flash = memory.plan(c, mesh, memory.Workload(flash_attention=True))
  assert flash["activations_no_remat"] < r["activations_no_remat"]
  cf = memory.plan(c, mesh, memory.Workload(capacity_factor=1.25))
  assert cf["activations_no_remat"] < r["activations_no_remat"]
  assert memory.fits(r["inference"], memory.HBM["v5e"])
  assert not memory.fits(r["train_no_remat"], memory.HBM["v5p"])
