"""The Pallas attention under a mesh (8 fake CPU devices, interpret mode), as a subprocess.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_attention_checks.py CHECK

CHECK is `kernel`, `cache` (the kernel's cache cases only), `model` or `decode`. Prints one
JSON object (the last stdout line) of measured differences; `test_kernels_sharded.py` holds
the tolerances. References are always unsharded and use the XLA attention
(`model.layers.attention`).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import llada_jax  # noqa: E402
from llada_jax import masks, parallel  # noqa: E402
from llada_jax.kernels import block_attention as ba  # noqa: E402
from llada_jax.kernels import sharded_attention as sa  # noqa: E402
from llada_jax.model import layers  # noqa: E402
from llada_jax.model.transformer import forward_core  # noqa: E402
from parallel_checks import load, max_abs, tree_rel  # noqa: E402

MESHES = ("data=2,expert=4", "fsdp=2,expert=2,tensor=2")


# ---- the attention alone ------------------------------------------------------------------------
def _layouts(kind: str, batch: int, tq: int, tk: int):
  """(q layout, k layout): "causal" block-causal forward (block 4); "decode" a window of tq
  queries in block 3 against tk - tq cache slots (row b holds 8 + 2b valid) and the window;
  "training" the 2L layout (tq = 2L) with two documents and padding."""
  if kind == "causal":
    lay = masks.from_block_length(batch, tq, 4)
    return lay, lay
  if kind == "training":
    length = tq // 2
    seg = np.where(np.arange(length) < length // 2, 0, 1)[None].repeat(batch, 0)
    seg[:, length - 2:] = -1
    lay = masks.training(length, 4, jnp.asarray(seg, jnp.int32))
    return lay, lay
  cache = tk - tq
  slots = np.arange(cache)
  kb = np.concatenate([np.broadcast_to(slots // 4, (batch, cache)),
                       np.full((batch, tq), 3)], 1)
  ks = np.concatenate([np.where(slots[None] < 8 + 2 * np.arange(batch)[:, None], 0, -1),
                       np.zeros((batch, tq), int)], 1)
  ql = masks.Layout(jnp.full((batch, tq), 3, jnp.int32), jnp.zeros((batch, tq), bool),
                    jnp.zeros((batch, tq), jnp.int32))
  kl = masks.Layout(jnp.asarray(kb, jnp.int32), jnp.zeros((batch, tk), bool),
                    jnp.asarray(ks, jnp.int32))
  return ql, kl


def _xla(q, k, v, ql, kl):
  return layers.attention(q, k, v, masks.visible(ql, kl))


def _value_and_grads(fn, q, k, v, ct, ql, kl):
  """Output and d/d(q, k, v) of sum(out * ct); rows that see no key are zeroed (the kernel
  gives them 0, the dense path a uniform row) and get no cotangent."""
  alive = jnp.any(masks.visible(ql, kl), axis=-1)[:, :, None, None]
  ct = jnp.where(alive, ct, 0)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, ql, kl) * ct)
  out = jnp.where(alive, fn(q, k, v, ql, kl), 0)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# (mesh, layout kind, B, Tq, Tk, H, KV): every head mode and a batch no batch axis divides.
KERNEL_CASES = (
    ("data=2,expert=4", "causal", 8, 16, 16, 4, 2),
    ("data=2,expert=4", "decode", 4, 8, 24, 4, 2),  # expert=4 does not divide 4/2: replicated
    ("fsdp=2,expert=2,tensor=2", "training", 4, 16, 16, 4, 2),  # heads "kv"
    ("fsdp=2,expert=2,tensor=2", "decode", 4, 8, 24, 4, 1),  # KV < tensor: "group"
    ("data=2,tensor=4", "causal", 2, 16, 16, 8, 2),  # KV 2 < tensor 4: "group"
    ("data=4,tensor=2", "training", 4, 16, 16, 6, 3),  # KV 3 on tensor 2: "gather"
    ("data=2,tensor=4", "decode", 2, 8, 24, 6, 2),  # 6 heads on tensor 4: "replicate"
    ("data=2,expert=4", "causal", 3, 16, 16, 4, 2),  # batch 3: nothing divides, all replicated
)


def check_kernel() -> dict:
  """`attention_impl="pallas"`'s function under each mesh vs unsharded XLA attention."""
  res = {}
  for spec, kind, b, tq, tk, h, kv in KERNEL_CASES:
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v, ct = f(b, tq, h, 8), f(b, tk, kv, 8), f(b, tk, kv, 8), f(b, tq, h, 8)
    ql, kl = _layouts(kind, b, tq, tk)
    ref_out, ref_g = jax.jit(functools.partial(_value_and_grads, _xla))(q, k, v, ct, ql, kl)
    mesh = parallel.make_mesh(spec)
    plan = sa.plan_sharding(parallel.mesh_shape(mesh), b, h, kv)
    with jax.set_mesh(mesh):
      fn = jax.jit(functools.partial(_value_and_grads, ba.pallas_attention))
      out, g = fn(q, k, v, ct, ql, kl)
      hlo = fn.lower(q, k, v, ct, ql, kl).as_text()
    res[f"{spec}|{kind}|B={b},Tq={tq},Tk={tk},H={h},KV={kv}"] = dict(
        out_max_abs=max_abs(out, ref_out), grads_max_abs=max(map(max_abs, g, ref_g)),
        batch_axes=list(plan.batch_axes), head_mode=plan.head_mode,
        shard_map="sdy.manual_computation" in hlo)
  res.update(_kernel_variants())
  res.update(_cache_cases())
  return res


# (mesh, B, W, S, H, KV): the KV cache as separate operands `[L, B, KV, S, d]` read by layer
# index, in every head mode (forward only: decoding).
CACHE_CASES = (
    ("data=2,expert=4", 4, 8, 16, 4, 2),  # batch over data, heads not split
    ("fsdp=2,expert=2,tensor=2", 4, 8, 16, 4, 2),  # "kv": the cache's KV heads split
    ("fsdp=2,expert=2,tensor=2", 4, 8, 16, 4, 1),  # "group": cache replicated, head by index
    ("data=4,tensor=2", 4, 8, 16, 6, 3),  # "gather"
    ("data=2,tensor=4", 2, 8, 16, 6, 2),  # "replicate"
)


def _cache_cases() -> dict:
  res = {}
  for spec, b, w, slots, h, kv in CACHE_CASES:
    rng = np.random.default_rng(2)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = f(b, w, h, 8), f(b, slots + w, kv, 8), f(b, slots + w, kv, 8)
    ql, kl = _layouts("decode", b, w, slots + w)
    alive = jnp.any(masks.visible(ql, kl), axis=-1)[:, :, None, None]
    ref = jnp.where(alive, _xla(q, k, v, ql, kl), 0)
    split = lambda x, a, z: x[:, a:z]
    cl = masks.Layout(*(split(x, 0, slots) for x in (kl.block, kl.noisy, kl.segment)))
    wl = masks.Layout(*(split(x, slots, None) for x in (kl.block, kl.noisy, kl.segment)))
    to_cache = lambda x: jnp.swapaxes(x[:, :slots], 1, 2)  # [B, KV, S, d]
    stack = lambda x: jnp.stack([to_cache(x) * 0 + 9, to_cache(x)])  # layer 1 is the real one
    mesh = parallel.make_mesh(spec)
    plan = sa.plan_sharding(parallel.mesh_shape(mesh), b, h, kv)
    fn = jax.jit(lambda q, k, v, ck, cv, i: ba.pallas_attention(
        q, k, v, ql, wl, cache_k=ck, cache_v=cv, cache_layout=cl, cache_index=i))
    with jax.set_mesh(mesh):
      args = (q, k[:, slots:], v[:, slots:], stack(k), stack(v), jnp.int32(1))
      out = fn(*args)
      hlo = fn.lower(*args).as_text()
    res[f"{spec}|cache|B={b},W={w},S={slots},H={h},KV={kv}"] = dict(
        out_max_abs=max_abs(jnp.where(alive, out, 0), ref), head_mode=plan.head_mode,
        shard_map="sdy.manual_computation" in hlo)
  return res


def _kernel_variants() -> dict:
  """Forward values on a mesh with Explicit axes (`jax.make_mesh`'s default: inputs resharded
  to the kernel's specs) and inside a user's `shard_map` over `data` only (check_vma=False:
  the kernel then splits heads over the remaining `tensor` axis)."""
  rng = np.random.default_rng(1)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = f(4, 16, 4, 8), f(4, 16, 2, 8), f(4, 16, 2, 8)
  ql, kl = _layouts("causal", 4, 16, 16)
  alive = jnp.any(masks.visible(ql, kl), axis=-1)[:, :, None, None]
  ref = jnp.where(alive, _xla(q, k, v, ql, kl), 0)
  res = {}
  explicit = jax.make_mesh((2, 2, 2), ("data", "expert", "tensor"))
  with jax.set_mesh(explicit):
    q_in = jax.device_put(q, jax.sharding.NamedSharding(explicit, P("data")))
    out = jax.jit(ba.pallas_attention)(q_in, k, v, ql, kl)
  res["explicit data=2,expert=2,tensor=2"] = dict(
      out_max_abs=max_abs(jnp.where(alive, out, 0), ref), out_spec=str(out.sharding.spec))
  with jax.set_mesh(parallel.make_mesh("data=2,tensor=4")):
    inner = jax.shard_map(ba.pallas_attention, in_specs=P("data"), out_specs=P("data"),
                          axis_names={"data"}, check_vma=False)
    out = jax.jit(inner)(q, k, v, ql, kl)
  res["inside shard_map over data, tensor=4"] = dict(
      out_max_abs=max_abs(jnp.where(alive, out, 0), ref))
  return res


# ---- the model: forward logits and loss gradients -----------------------------------------------
def _loss(config, attention_impl, moe_impl, params, ids, targets):
  """Mean next-token-ish cross entropy of a block-causal (block 4) forward."""
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  out = forward_core(params, config, ids, pos, masks.from_block_length(b, t, 4),
                     attention_impl=attention_impl, moe_impl=moe_impl)
  logp = jax.nn.log_softmax(out.logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


MODEL_CASES = (("llada2_tiny", "data=2,expert=4"), ("llada2_tiny", "fsdp=2,expert=2,tensor=2"),
               ("llada2_tiny_groups", "fsdp=2,expert=2,tensor=2"))  # the last: KV 1 < tensor 2


def check_model() -> dict:
  """Per (fixture, mesh): `parallel.sharded_forward(..., attention_impl="pallas")` logits and
  the gradients of a loss through the sharded Pallas attention (params sharded by the rules,
  MoE "ep") vs the unsharded XLA-attention forward and gradients."""
  res, refs = {}, {}
  for name, spec in MODEL_CASES:
    config, params, gold = load(name)
    ids = np.tile(gold["fwd_input_ids"][None].astype(np.int32), (8, 1))
    ids[1::2] = ids[1::2, ::-1]
    targets = (ids * 7 + 3) % config.vocab_size
    grad = lambda a, m: jax.jit(jax.value_and_grad(functools.partial(_loss, config, a, m)))
    if name not in refs:
      refs[name] = (llada_jax.forward(params, config, ids, block_length=4, attention_impl="xla",
                                      moe_impl="ragged"),
                    *grad("xla", "ragged")(params, ids, targets))
    ref_logits, ref_loss, ref_grads = refs[name]
    mesh = parallel.make_mesh(spec)
    logits = parallel.sharded_forward(params, config, ids, mesh, block_length=4,
                                      attention_impl="pallas")
    tok = parallel.activation_sharding("tokens", ids.shape, mesh)
    with jax.set_mesh(mesh):
      loss, grads = grad("pallas", "ep")(parallel.shard_params(params, config, mesh),
                                         parallel.put(ids, tok), parallel.put(targets, tok))
    res[f"{name}|{spec}"] = dict(
        logits_max_abs=max_abs(logits, ref_logits),
        logits_scale=float(np.max(np.abs(np.asarray(ref_logits)))),
        row0_vs_golden=max_abs(np.asarray(logits)[0], gold["fwd_block4_logits"]),
        loss_abs=abs(float(loss) - float(ref_loss)), grads_rel=tree_rel(grads, ref_grads),
        grads_max_abs=max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(max_abs, grads,
                                                                           ref_grads))))
  return res


# ---- decoding against the KV cache --------------------------------------------------------------
def check_decode() -> dict:
  """`parallel.sharded_generate(..., attention_impl="pallas")` vs unsharded XLA `generate`
  on the fixture's first run (two prompts of different lengths)."""
  config, params, gold = load("llada2_tiny")
  with open(os.path.join(HERE, "fixtures", "llada2_tiny", "golden.json")) as f:
    run = json.load(f)["generate"][0]
  prompt = [int(t) for t in gold["gen_prompt_ids"]]
  kw = dict(run["params"], mask_id=511)
  prompts = [prompt, prompt[:5]]
  ref = llada_jax.generate(params, config, prompts, attention_impl="xla", moe_impl="ragged",
                           **kw)
  res = {}
  for spec in MESHES:
    out = parallel.sharded_generate(params, config, prompts, parallel.make_mesh(spec),
                                    attention_impl="pallas", **kw)
    res[spec] = dict(same_as_unsharded=out.output_ids == ref.output_ids,
                     same_nfe=out.nfe == ref.nfe,
                     row0_matches_fixture=out.output_ids[0] == run["output_ids"])
  return res


CHECKS = {"kernel": check_kernel, "cache": _cache_cases, "model": check_model,
          "decode": check_decode}

if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps(CHECKS[sys.argv[1]]()))
