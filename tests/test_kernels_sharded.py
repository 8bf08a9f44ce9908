"""The Pallas block-diffusion attention under device meshes, `attention_impl="auto"` and the
interpret-mode warning.

The multi-device checks run `sharded_attention_checks.py` in a subprocess with 8 fake CPU
devices (the pytest process may already own a 1-device JAX); the kernel is interpreted there.
Tolerances: the attention alone within 1e-5 absolute of unsharded XLA attention, values and
gradients (as `test_kernels_attention.py`; observed <= 1.2e-6); the model's logits within
1e-5 x max|logits| (as `test_parallel_sharded.py`; observed 1.5e-5 on logits of ~24), loss
within 1e-5 and parameter gradients within 1e-5 relative (observed 2.3e-6).
"""

import inspect
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from llada_jax import masks, parallel
from llada_jax.kernels import block_attention as ba
from llada_jax.kernels import sharded_attention as sa
from llada_jax.model import transformer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from parallel_checks import FAST_COMPILE  # noqa: E402


def run_check(name: str, timeout: int = 400) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  p = subprocess.run([sys.executable, os.path.join(HERE, "sharded_attention_checks.py"), name],
                     capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the split (no devices needed) --------------------------------------------------------------
MESH = dict(data=1, fsdp=2, expert=2, tensor=2)


@pytest.mark.parametrize("sizes, batch, heads, kv, batch_axes, head_axes, mode", [
    (MESH, 8, 4, 2, ("fsdp", "expert"), ("tensor",), "kv"),
    (MESH, 8, 4, 1, ("fsdp", "expert"), ("tensor",), "group"),  # KV 1 < tensor 2
    (dict(MESH, tensor=4), 8, 8, 2, ("fsdp", "expert"), ("tensor",), "group"),
    (MESH, 8, 6, 3, ("fsdp", "expert"), ("tensor",), "gather"),  # groups straddle devices
    (dict(MESH, tensor=4), 8, 6, 2, ("fsdp", "expert"), (), "replicate"),  # 6 % 4 != 0
    (MESH, 2, 4, 2, ("fsdp",), ("tensor",), "kv"),  # expert does not divide the rest of B
    (MESH, 3, 4, 2, (), ("tensor",), "kv"),  # nothing divides 3 rows
    (dict(data=8, fsdp=1, expert=1, tensor=1), 8, 4, 2, ("data",), (), "none"),
])
def test_plan_sharding(sizes, batch, heads, kv, batch_axes, head_axes, mode):
  plan = sa.plan_sharding(sizes, batch, heads, kv)
  assert (plan.batch_axes, plan.head_axes, plan.head_mode) == (batch_axes, head_axes, mode)


def test_axes_follow_the_default_rules():
  """The kernel package may not import the rules (they import the model): same names here."""
  assert sa.BATCH_AXES == parallel.DEFAULT_RULES["batch"]
  assert sa.HEAD_AXES == parallel.DEFAULT_RULES["heads"] == parallel.DEFAULT_RULES["kv_heads"]


def test_specs():
  plan = sa.plan_sharding(MESH, 8, 4, 1)
  q, kv, ids = plan.specs()
  assert q == jax.sharding.PartitionSpec(("fsdp", "expert"), None, "tensor", None)
  assert kv == jax.sharding.PartitionSpec(("fsdp", "expert"), None, None, None)
  assert ids == jax.sharding.PartitionSpec(("fsdp", "expert"), None)


@pytest.mark.parametrize("spec, heads, kv", [("data=2,fsdp=2,expert=2,tensor=2", 4, 2),
                                             ("fsdp=4,tensor=4", 8, 2)])
def test_tpu_lowering_under_an_abstract_mesh(spec, heads, kv):
  """Forward and backward Mosaic kernels lower inside shard_map on a mesh (the error this
  replaces: "Mosaic kernels cannot be automatically partitioned")."""
  mesh = parallel.make_abstract_mesh(spec)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  lay = lambda t: masks.Layout(s((8, t), jnp.int32), s((8, t), jnp.bool_), s((8, t), jnp.int32))

  def fn(q, k, v, ql, kl):
    f = lambda q, k, v: jnp.sum(ba.pallas_tpu_attention(q, k, v, ql, kl).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  with jax.sharding.use_abstract_mesh(mesh):
    exp = jax.export.export(jax.jit(fn), platforms=("tpu",))(
        s((8, 32, heads, 128), jnp.bfloat16), s((8, 160, kv, 128), jnp.bfloat16),
        s((8, 160, kv, 128), jnp.bfloat16), lay(32), lay(160))
  text = exp.mlir_module()
  assert exp.nr_devices == 16
  assert text.count("@tpu_custom_call(") == 3 and "sdy.manual_computation" in text


@pytest.mark.parametrize("spec, heads, kv", [("data=2,fsdp=2,expert=2,tensor=2", 4, 2),
                                             ("fsdp=4,tensor=4", 8, 2),
                                             ("data=2,tensor=2", 6, 3)])
def test_tpu_lowering_against_the_cache_under_an_abstract_mesh(spec, heads, kv):
  """The decode kernel with the stacked cache as operands lowers inside shard_map ("kv",
  "group" and "gather" head modes) and nothing slices, pads or transposes the cache."""
  mesh = parallel.make_abstract_mesh(spec)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  lay = lambda t: masks.Layout(s((8, t), jnp.int32), s((8, t), jnp.bool_), s((8, t), jnp.int32))
  cache = s((3, 8, kv, 512, 128), jnp.bfloat16)

  def fn(q, k, v, ql, kl, ck, cv, cl, i):
    return ba.pallas_tpu_attention(q, k, v, ql, kl, cache_k=ck, cache_v=cv, cache_layout=cl,
                                   cache_index=i)
  with jax.sharding.use_abstract_mesh(mesh):
    exp = jax.export.export(jax.jit(fn), platforms=("tpu",))(
        s((8, 32, heads, 128), jnp.bfloat16), s((8, 32, kv, 128), jnp.bfloat16),
        s((8, 32, kv, 128), jnp.bfloat16), lay(32), lay(32), cache, cache, lay(512),
        s((), jnp.int32))
  text = exp.mlir_module()
  assert text.count("@tpu_custom_call(") == 1 and "sdy.manual_computation" in text
  big = [line for line in text.splitlines() if "x512x128x" in line and any(
      op in line for op in ("concatenate", "pad", "transpose", "dynamic_slice", "gather"))]
  assert not big, big


def test_no_mesh_calls_the_kernel_directly():
  assert sa.context_mesh() is None
  calls = []
  out = sa.shard_attention(lambda *a: calls.append(a) or a[0], *[jnp.zeros((1, 2, 1, 1))] * 3,
                           None, None)
  assert len(calls) == 1 and out.shape == (1, 2, 1, 1)


# ---- "auto" and the interpret-mode warning ------------------------------------------------------
def test_auto_attention(monkeypatch):
  assert "auto" in transformer.attention_names()
  assert inspect.signature(transformer.forward).parameters["attention_impl"].default == "auto"
  assert transformer.resolve_attention("auto") == "xla"  # this CPU host
  assert transformer.get_attention("auto") is transformer.xla_attention
  assert transformer.resolve_attention("pallas") == "pallas"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert transformer.resolve_attention("auto") == "pallas_tpu"
  assert transformer.get_attention("auto") is ba.pallas_tpu_attention


def test_pallas_off_tpu_warns_once(monkeypatch):
  monkeypatch.setattr(ba, "_warned_interpret", False)
  q = jnp.ones((1, 8, 2, 8))
  lay = masks.from_block_length(1, 8, 4)
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for _ in range(2):
      ba.pallas_attention(q, q[:, :, :1], q[:, :, :1], lay, lay)
  msgs = [str(w.message) for w in seen if "interpret mode" in str(w.message)]
  assert len(msgs) == 1 and "slow, for testing" in msgs[0]


# ---- 8 fake devices -----------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_kernel_matches_unsharded_xla():
  """Every head mode, batch splits and a batch nothing divides; causal, decode (Tq != Tk) and
  2L training layouts; values and gradients; plus Explicit mesh axes and a call inside a
  user's shard_map."""
  res = run_check("kernel")
  modes = set()
  for case, r in res.items():
    assert r["out_max_abs"] <= 1e-5, (case, r)
    if "grads_max_abs" in r:
      assert r["grads_max_abs"] <= 1e-5, (case, r)
      assert r["shard_map"], case
      modes.add(r["head_mode"])
  assert modes == {"none", "kv", "group", "gather", "replicate"}
  cache_modes = {r["head_mode"] for case, r in res.items() if "|cache|" in case}
  assert cache_modes == {"none", "kv", "group", "gather", "replicate"}
  assert all(r["shard_map"] for case, r in res.items() if "|cache|" in case)
  assert res["data=2,expert=4|causal|B=3,Tq=16,Tk=16,H=4,KV=2"]["batch_axes"] == []
  assert res["data=2,expert=4|decode|B=4,Tq=8,Tk=24,H=4,KV=2"]["batch_axes"] == ["data"]
  assert res["explicit data=2,expert=2,tensor=2"]["out_spec"] == (
      "P(('data', 'expert'), None, 'tensor', None)")


@pytest.mark.slow
def test_sharded_model_forward_and_gradients_match_unsharded_xla():
  """`sharded_forward(..., attention_impl="pallas")` and loss gradients (MoE "ep") on
  data=2,expert=4 and fsdp=2,expert=2,tensor=2 (also with 1 KV head: split query heads)."""
  res = run_check("model")
  assert len(res) == 3
  for case, r in res.items():
    assert r["logits_max_abs"] <= 1e-5 * r["logits_scale"], (case, r)
    assert r["row0_vs_golden"] <= 1e-4, (case, r)
    assert r["loss_abs"] <= 1e-5, (case, r)
    assert r["grads_rel"] <= 1e-5, (case, r)


@pytest.mark.slow
def test_sharded_decode_with_pallas_matches_unsharded_xla():
  res = run_check("decode")
  assert set(res) == {"data=2,expert=4", "fsdp=2,expert=2,tensor=2"}
  for spec, r in res.items():
    assert r == dict(same_as_unsharded=True, same_nfe=True, row0_matches_fixture=True), spec

