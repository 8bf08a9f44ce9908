"""Multi-device checks of `llada_jax.parallel`, run as a subprocess with 8 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_checks.py CHECK

CHECK is `model`, `moe` or `decode`. Prints one JSON object (the last stdout line) with the
measured differences; the pytest side (`test_parallel_sharded.py`) holds the tolerances.
The pytest process may already own a 1-device JAX, hence the separate process. The loss and
train step here are also used by the 2-process test (`parallel_multihost_worker.py`).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import llada_jax  # noqa: E402
from llada_jax import masks, parallel  # noqa: E402
from llada_jax.model import moe as moe_lib  # noqa: E402
from llada_jax.model.transformer import forward_core  # noqa: E402

MESHES = ("data=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2")
# XLA flags for the test subprocesses: cheaper XLA:CPU code generation (the same programs in
# about half the compile time).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FIXTURES = os.path.join(HERE, "fixtures")


def load(name: str):
  config, params = llada_jax.load_hf_checkpoint(os.path.join(FIXTURES, name))
  return config, params, dict(np.load(os.path.join(FIXTURES, name, "golden.npz")))


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_rel(a, b) -> float:
  """Worst leaf of max|a - b| / max|b|."""
  def one(x, y):
    y = np.asarray(y, np.float64)
    return max_abs(x, y) / max(float(np.max(np.abs(y))), 1e-30)
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(one, a, b)))


# ---- whole model: a train step (logits, gradients, optimizer state) ---------------------------
def _loss(config, moe_impl, params, ids, targets):
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  out = forward_core(params, config, ids, pos, masks.from_block_length(b, t, 4),
                     moe_impl=moe_impl)
  logp = jax.nn.log_softmax(out.logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)), out.logits


# SGD with momentum and weight decay: a param-shaped optimizer state, and an update that is a
# smooth function of the gradients (Adam's first step, g/|g|, would amplify rounding noise).
OPTIMIZER = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(1e-2, momentum=0.9))


def train_step(config, moe_impl, params, opt_state, ids, targets):
  (loss, logits), grads = jax.value_and_grad(
      functools.partial(_loss, config, moe_impl), has_aux=True)(params, ids, targets)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, logits, grads


def batch(config, gold):
  """8 rows built from the fixture's forward input, and next-token-ish targets."""
  ids = np.tile(gold["fwd_input_ids"][None].astype(np.int32), (8, 1))
  ids[1::2] = ids[1::2, ::-1]  # rows differ
  return ids, (ids * 7 + 3) % config.vocab_size


def sharded_train_step(config, mesh, ids_shape):
  """`train_step` jitted with params / optimizer state / grads sharded by the rules, the batch
  split over the batch axes, logits by the activation rules."""
  ps = parallel.param_shardings(config, mesh)
  opt_shapes = jax.eval_shape(OPTIMIZER.init, llada_jax.param_shapes(config))
  os_ = parallel.opt_state_shardings(opt_shapes, ps, mesh)
  tok = parallel.activation_sharding("tokens", ids_shape, mesh)
  logits = parallel.activation_sharding("logits", ids_shape + (config.vocab_size,), mesh)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(functools.partial(train_step, config, "ep"),
                 in_shardings=(ps, os_, tok, tok), out_shardings=(ps, os_, rep, logits, ps))
  return step, ps, os_, tok


MODEL_CASES = tuple(("llada2_tiny", spec) for spec in MESHES)


def check_model(cases=MODEL_CASES) -> dict:
  """Per (fixture, mesh): one sharded train step (params and optimizer state by the rules,
  batch split, MoE "ep") vs the unsharded one: logits, loss, gradients, updated params; on
  data=2,expert=4 also the batch-1 golden input through `sharded_forward`."""
  res = {}
  for name in dict.fromkeys(n for n, _ in cases):
    config, params, gold = load(name)
    ids, targets = batch(config, gold)
    opt_state = OPTIMIZER.init(params)
    ref = jax.jit(functools.partial(train_step, config, "ragged"))(params, opt_state, ids,
                                                                   targets)
    ref_params, _, ref_loss, ref_logits, ref_grads = ref
    ids1 = ids[:1]
    ref1 = np.asarray(llada_jax.forward(params, config, ids1, block_length=4))
    for spec in (s for n, s in cases if n == name):
      mesh = parallel.make_mesh(spec)
      step, ps, os_, tok = sharded_train_step(config, mesh, ids.shape)
      with jax.set_mesh(mesh):
        new_params, new_opt, loss, logits, grads = step(
            parallel.put(params, ps), parallel.put(opt_state, os_), parallel.put(ids, tok),
            parallel.put(targets, tok))
      r = res[f"{name}|{spec}"] = dict(
          logits_max_abs=max_abs(logits, ref_logits),
          logits_scale=float(np.max(np.abs(ref_logits))),
          loss_abs=abs(float(loss) - float(ref_loss)), grads_rel=tree_rel(grads, ref_grads),
          params_after_step_max_abs=max(jax.tree_util.tree_leaves(
              jax.tree_util.tree_map(max_abs, new_params, ref_params))),
          expert_spec=str(new_params["moe"]["experts"]["gate"].sharding.spec),
          momentum_expert_spec=str(
              new_opt[1][0].trace["moe"]["experts"]["gate"].sharding.spec))
      if spec == "data=2,expert=4":
        out1 = parallel.sharded_forward(params, config, ids1, mesh, block_length=4)
        r.update(batch1_logits_max_abs=max_abs(out1, ref1),
                 batch1_vs_golden=max_abs(np.asarray(out1)[0], gold["fwd_block4_logits"]))
  return res


# ---- the MoE layer alone ------------------------------------------------------------------------
def _moe_inputs(config, params, n, seed=0):
  lp = jax.tree_util.tree_map(lambda a: a[0], params["moe"])
  x = jax.random.normal(jax.random.PRNGKey(seed), (1, n, config.hidden_size), jnp.float32)
  ct = jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape, jnp.float32)
  return lp, x, ct


def _moe_fn(config, impl):
  def f(p, x, ct):
    y, _, _, stats = moe_lib.moe_block(p, x, config, impl=impl, return_stats=True)
    return jnp.sum(y * ct), (y, stats)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def expected_drops(idx: np.ndarray, shards: int, num_experts: int, cap: int) -> np.ndarray:
  """Which token copies the dense dispatch drops: tokens are cut into `shards` contiguous
  chunks; within a chunk copies are taken in (token, k) order and each expert keeps `cap`."""
  n, k = idx.shape
  drop = np.zeros((n, k), bool)
  for chunk in np.split(np.arange(n), shards):
    seen = np.zeros(num_experts, int)
    for i in chunk:
      for j in range(k):
        e = idx[i, j]
        drop[i, j] = seen[e] >= cap
        seen[e] += 1
  return drop


def expected_drops_ragged(idx: np.ndarray, groups: int, ep: int, num_experts: int,
                          rows: int) -> np.ndarray:
  """Which copies the ragged dispatch drops on a mesh whose token shards are (group, expert
  shard) in that order: each destination's buffer of `rows` rows is filled by sources 0..ep-1,
  each with its copies for that destination sorted by expert (stable in (token, k) order)."""
  n, k = idx.shape
  e_loc = num_experts // ep
  drop = np.zeros((n, k), bool)
  chunks = np.split(np.arange(n), groups * ep)
  for g in range(groups):
    filled = np.zeros(ep, int)
    for s in range(ep):
      copies = [(idx[i, j], i, j) for i in chunks[g * ep + s] for j in range(k)]
      for e, i, j in sorted(copies, key=lambda c: c[0]):  # stable: (token, k) order kept
        dst = e // e_loc
        drop[i, j] = filled[dst] >= rows
        filled[dst] += 1
  return drop


def check_moe() -> dict:
  """The MoE block with expert parallelism vs the single-device "ragged" implementation:
  outputs, gradients (params and input) and the load-balance statistics."""
  res = {}
  dense = parallel.EPConfig()
  cases = [  # (fixture, tokens, mesh, variant name, EPConfig)
      *[("llada2_tiny_groups", 64, spec, "dense", dense) for spec in MESHES],
      # 20 tokens: not a multiple of the 8 token shards (padding path)
      ("llada2_tiny", 20, "data=2,expert=4", "dense", dense),
      *[("llada2_tiny_groups", 64, spec, "ragged_emulated",
         parallel.EPConfig(dispatch="ragged", emulate_ragged=True))
        for spec in ("data=2,expert=4", "fsdp=2,expert=2,tensor=2")],
      ("llada2_tiny", 64, "fsdp=2,expert=2,tensor=2", "einsum", parallel.EPConfig(gmm="einsum")),
      # the megablox Pallas kernel, interpreted on CPU
      ("llada2_tiny", 32, "fsdp=2,expert=2,tensor=2", "megablox",
       parallel.EPConfig(gmm="megablox")),
  ]
  # every token picks experts 0 and 1: the worst case the dropless capacity is sized for
  cases.append(("llada2_tiny", 64, "data=2,expert=4", "skewed", dense))
  refs = {}
  for name, n, spec, vname, cfg in cases:
    config, params, _ = load(name)
    lp, x, ct = _moe_inputs(config, params, n)
    if vname == "skewed":
      lp["router"]["expert_bias"] = lp["router"]["expert_bias"].at[:2].add(100.0)
    ref_key = (name, n, vname == "skewed")
    if ref_key not in refs:
      refs[ref_key] = _moe_fn(config, "ragged")(lp, x, ct)
    (_, (ref_y, ref_stats)), ref_g = refs[ref_key]
    with jax.set_mesh(parallel.make_mesh(spec)):
      (_, (y, stats)), g = _moe_fn(config, parallel.register_ep(cfg))(lp, x, ct)
    res[f"{name}|n={n}|{spec}|{vname}"] = dict(
        y_max_abs=max_abs(y, ref_y), grads_rel=tree_rel(g, ref_g),
        tokens_per_expert_equal=bool(np.array_equal(stats["tokens_per_expert"],
                                                    ref_stats["tokens_per_expert"])),
        tokens=int(np.sum(stats["tokens_per_expert"])),
        expected_tokens=n * config.num_experts_per_tok, dropped=int(stats["dropped"]),
        capacity=int(stats["capacity"]), max_tokens_per_expert=int(np.max(
            stats["tokens_per_expert"])))
  # Capacity factor 1: drops happen, are counted, and exactly the predicted copies are lost.
  config, params, _ = load("llada2_tiny")
  lp, x, ct = _moe_inputs(config, params, 64, seed=3)
  n, e, k = 64, config.num_experts, config.num_experts_per_tok
  for spec in ("data=2,expert=4", "fsdp=2,expert=2,tensor=2"):
    mesh = parallel.make_mesh(spec)
    shards = 8 if "tensor" not in spec else 4
    cap = parallel.capacity(n // shards, k, e, 1.0)
    impl = parallel.register_ep(parallel.EPConfig(capacity_factor=1.0))
    with jax.set_mesh(mesh):
      y, _, _, stats = jax.jit(lambda p, x: moe_lib.moe_block(p, x, config, impl=impl,
                                                              return_stats=True))(lp, x)
    flat = x.reshape(n, -1)
    _, idx, w = moe_lib.route(flat, lp["router"]["weight"], lp["router"]["expert_bias"], config)
    drop = expected_drops(np.asarray(idx), shards, e, cap)
    outs = moe_lib.experts_ragged(flat, idx, lp["experts"]["gate"], lp["experts"]["up"],
                                  lp["experts"]["down"])
    kept_w = jnp.where(jnp.asarray(drop), 0.0, w)
    ref = jnp.einsum("nkd,nk->nd", outs, kept_w)
    s = lp["shared"]
    ref = ref + (jax.nn.silu(flat @ s["gate"]) * (flat @ s["up"])) @ s["down"]
    res[f"capacity_factor=1|{spec}"] = dict(
        capacity=int(stats["capacity"]), expected_capacity=cap, dropped=int(stats["dropped"]),
        expected_dropped=int(drop.sum()), y_max_abs=max_abs(y[0], ref),
        tokens=int(np.sum(stats["tokens_per_expert"])))
    if spec == "data=2,expert=4":  # the ragged path's receive buffer with the same factor
      impl = parallel.register_ep(parallel.EPConfig(dispatch="ragged", capacity_factor=1.0,
                                                    emulate_ragged=True))
      rows = parallel.expert_parallel.ragged_buffer_rows(n // 8, k, 4, e // 4, 1.0)
      with jax.set_mesh(mesh):
        y, _, _, stats = jax.jit(lambda p, x: moe_lib.moe_block(p, x, config, impl=impl,
                                                                return_stats=True))(lp, x)
      drop = expected_drops_ragged(np.asarray(idx), 2, 4, e, rows)
      ref = jnp.einsum("nkd,nk->nd", outs, jnp.where(jnp.asarray(drop), 0.0, w))
      ref = ref + (jax.nn.silu(flat @ s["gate"]) * (flat @ s["up"])) @ s["down"]
      res[f"ragged_capacity_factor=1|{spec}"] = dict(
          capacity=int(stats["capacity"]), expected_capacity=rows,
          dropped=int(stats["dropped"]), expected_dropped=int(drop.sum()),
          y_max_abs=max_abs(y[0], ref), tokens=int(np.sum(stats["tokens_per_expert"])))
  return res


# ---- decoding -----------------------------------------------------------------------------------
def check_decode() -> dict:
  """`generate` with params sharded and MoE expert-parallel vs unsharded and the fixture."""
  config, params, gold = load("llada2_tiny")
  with open(os.path.join(FIXTURES, "llada2_tiny", "golden.json")) as f:
    run = json.load(f)["generate"][0]
  prompt = [int(t) for t in gold["gen_prompt_ids"]]
  kw = dict(run["params"], mask_id=511)
  prompts = [prompt, prompt[:5]]  # ragged rows: one finishes while the other still runs
  ref = llada_jax.generate(params, config, prompts, **kw)
  res = {}
  for spec in ("data=2,expert=4",):
    out = parallel.sharded_generate(params, config, prompts, parallel.make_mesh(spec), **kw)
    res[spec] = dict(same_as_unsharded=out.output_ids == ref.output_ids,
                     same_nfe=out.nfe == ref.nfe,
                     row0_matches_fixture=out.output_ids[0] == run["output_ids"])
  return res


CHECKS = {"model": check_model, "moe": check_moe, "decode": check_decode}

if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps(CHECKS[sys.argv[1]]()))
