"""The jitted train steps of every objective, one shape for all of them:

  random draws of the whole batch (no params) -> the loss normalisers of the whole batch ->
  gradients summed over `accum` micro-batches (`lax.scan`) -> one optimizer update.

Each objective splits its loss into a per-batch *share* normalised by the whole batch's
denominators, so the shares of the micro-batches add up to the loss of the whole batch and a
step with `accum` micro-batches equals one step on the whole batch (up to float summation order).
The params are cast to the compute dtype inside the step: with fp32 master params the forward
and backward run in `c.dtype` and the gradients and optimizer moments stay fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from llada_jax.config import ModelConfig
from llada_jax.model import params as params_lib
from llada_jax.train import dpo as dpo_lib
from llada_jax.train import ebpo as ebpo_lib
from llada_jax.train import objectives as obj


# ---- pieces ---------------------------------------------------------------------------------
def compute_params(params, c: ModelConfig):
  """`params` in the compute dtype `c.dtype` (router leaves stay float32)."""
  return params_lib.cast_params(params, c.replace(param_dtype=c.dtype))


def micro_batches(tree, n: int):
  """Per-row arrays `[B, ...]` -> `[n, B / n, ...]`; micro-batch i holds rows i, i + n, ...
  (so every device keeps an equal share of each micro-batch)."""
  def one(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree_util.tree_map(one, tree)


def _constrain_rows(tree, rows_spec: Callable[[tuple], P] | None):
  if rows_spec is None:
    return tree
  return jax.tree_util.tree_map(
      lambda x: jax.lax.with_sharding_constraint(x, rows_spec(x.shape)), tree)


def accumulate(fn, params, data, n: int, rows_spec=None):
  """(loss, sums, grads) of `fn(params, data) -> (loss share, metric sums)` summed over `n`
  micro-batches of `data` (per-row arrays); `n = 1` is one pass over the whole batch."""
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  if n == 1:
    (loss, sums), grads = grad_fn(params, data)
    return loss, sums, grads
  micro = micro_batches(data, n)

  def body(carry, d):
    d = _constrain_rows(d, rows_spec)
    (loss, sums), grads = grad_fn(params, d)
    return jax.tree_util.tree_map(jnp.add, carry, (loss, sums, grads)), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  loss0, sums0 = jax.eval_shape(fn, params, first)
  zeros = lambda t: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  init = (zeros(loss0), zeros(sums0), jax.tree_util.tree_map(jnp.zeros_like, params))
  (loss, sums, grads), _ = jax.lax.scan(body, init, micro)
  return loss, sums, grads


def micro_sum(fn, data, n: int, rows_spec=None):
  """`sum_i fn(micro-batch i)` without gradients (e.g. a normaliser that needs a forward)."""
  if n == 1:
    return fn(data)
  micro = micro_batches(data, n)
  return jax.lax.map(lambda d: fn(_constrain_rows(d, rows_spec)), micro).sum(0)


def balance_expert_bias(params, old_params, load: jax.Array | None, rate: float):
  """`params` with every MoE layer's `router.expert_bias` `[Lm, E]` taken from `old_params`
  (no gradient step, no weight decay on it) and, with `rate` > 0 and the step's `load`
  `[Lm, E]`, nudged by +rate for experts below their layer's mean load and -rate above it (the
  auxiliary-loss-free balancing of the Ling/LLaDA2 recipe; SPEC 8)."""
  if "moe" not in params or "expert_bias" not in params["moe"].get("router", {}):
    return params
  bias = old_params["moe"]["router"]["expert_bias"]
  if rate > 0 and load is not None and load.shape[0]:
    nudge = jnp.sign(load.mean(-1, keepdims=True) - load)
    bias = bias + (rate * nudge).astype(bias.dtype)
  router = dict(params["moe"]["router"], expert_bias=bias)
  return dict(params, moe=dict(params["moe"], router=router))


def apply_update(optimizer, state, loss, grads, metrics, load=None, bias_rate: float = 0.0):
  """One optimizer update (the expert biases by `balance_expert_bias` with the step's expert
  `load`); a non-finite loss leaves the state untouched (and is reported)."""
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  params = balance_expert_bias(params, state["params"], load, bias_rate)
  ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  new = dict(params=keep(params, state["params"]), opt_state=keep(opt_state, state["opt_state"]),
             step=state["step"] + 1)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), finite=ok)
  return new, metrics


def _tokens(batch) -> jax.Array:
  return (batch["segment_ids"] >= 0).astype(jnp.float32).sum()


# ---- the three objectives -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a train step (hashable: it names a compiled program)."""

  c: ModelConfig
  oc: obj.ObjectiveConfig | None = None  # bdlm, dpo
  ecfg: ebpo_lib.EBPOConfig | None = None  # ebpo
  beta: float = 0.1  # dpo
  accum: int = 1
  bias_rate: float = 0.0  # bdlm: expert-bias balancing step (0: the biases stay as they are)


def bdlm_step(spec: StepSpec, optimizer, state, batch, key, extra=None, rows_spec=None):
  """BDLM / AR / MDLM / SFT-with-editing step on `batch` (dict of `[B, L]`)."""
  c, oc = spec.c, spec.oc
  noise = obj.bdlm_noise(key, batch, c, oc)
  denoms = obj.bdlm_denominators(noise, oc)
  if oc.cap_weight > 0 and spec.accum > 1:  # CAP's normaliser needs the model: one pre-pass
    cp = jax.lax.stop_gradient(compute_params(state["params"], c))
    denoms["cap"] = micro_sum(lambda d: obj.bdlm_cap_count(cp, c, d[0], d[1], oc),
                              (batch, noise), spec.accum, rows_spec)
  fn = lambda p, d: obj.bdlm_sums(compute_params(p, c), c, d[0], d[1], denoms, oc)
  loss, sums, grads = accumulate(fn, state["params"], (batch, noise), spec.accum, rows_spec)
  metrics = dict(obj.bdlm_metrics(sums, denoms, oc), tokens=_tokens(batch))
  return apply_update(optimizer, state, loss, grads, metrics, load=sums["expert_load"],
                      bias_rate=spec.bias_rate)


def dpo_step(spec: StepSpec, optimizer, state, batch, key, ref_params, rows_spec=None):
  """ELBO-DPO step on `batch = {"chosen", "rejected"}` against the frozen `ref_params`, or,
  when the batch carries them (`dpo.reference="precomputed"`: each side's `ref_elbo` `[B]` and
  `record` ids), against the reference ELBOs computed once per pair with the per-record noise
  of `key` (`dpo.record_noise`; `ref_params` is then None)."""
  c, oc = spec.c, spec.oc
  precomputed = "ref_elbo" in batch["chosen"]
  noise = (dpo_lib.record_noise if precomputed else dpo_lib.dpo_noise)(
      key, batch["chosen"], batch["rejected"], oc)
  n = batch["chosen"]["tokens"].shape[0]

  def fn(p, d):
    b, nz = d
    ref = ({k: b[k]["ref_elbo"] for k in ("chosen", "rejected")} if precomputed else None)
    return dpo_lib.dpo_sums(compute_params(p, c), ref_params, c, b["chosen"], b["rejected"], nz,
                            n, oc, spec.beta, ref_elbos=ref)

  loss, sums, grads = accumulate(fn, state["params"], (batch, noise), spec.accum, rows_spec)
  metrics = dict(dpo_lib.dpo_metrics(sums, n),
                 tokens=_tokens(batch["chosen"]) + _tokens(batch["rejected"]))
  return apply_update(optimizer, state, loss, grads, metrics)


def ebpo_step(spec: StepSpec, optimizer, state, batch, key=None, extra=None, rows_spec=None):
  """EBPO step on `batch = {"batch", "masks" [B, N, L], "old" [B, N, nb], "adv" [B]}`."""
  c, e = spec.c, spec.ecfg
  n = batch["adv"].shape[0]

  def fn(p, d):
    return ebpo_lib.ebpo_sums(compute_params(p, c), c, d["batch"], jnp.moveaxis(d["masks"], 1, 0),
                              jnp.moveaxis(d["old"], 1, 0), d["adv"], n, e)

  loss, sums, grads = accumulate(fn, state["params"], batch, spec.accum, rows_spec)
  metrics = dict(ebpo_lib.ebpo_metrics(sums, n), tokens=_tokens(batch["batch"]))
  return apply_update(optimizer, state, loss, grads, metrics)


def ebpo_old_logprobs(params, batch, key, *, c: ModelConfig, ecfg: ebpo_lib.EBPOConfig):
  """The rollout policy's per-block log-probs: (masks `[B, N, L]`, old `[B, N, nb]`)."""
  trainable = batch["loss_mask"] & (batch["segment_ids"] >= 0)
  _, masks_n = ecfg.draw_masks(key, trainable)
  old = ebpo_lib.policy_block_logprobs(compute_params(params, c), c, batch, masks_n,
                                       ecfg.block_length, **ecfg.impl)
  return jnp.moveaxis(masks_n, 0, 1), jnp.moveaxis(old, 0, 1)


def bdlm_eval(spec: StepSpec, params, batch, key) -> dict:
  """The BDLM metrics of `batch` without an update (held-out evaluation): the step's
  objective with the same noise recipe, the params cast to the compute dtype."""
  c, oc = spec.c, spec.oc
  noise = obj.bdlm_noise(key, batch, c, oc)
  denoms = obj.bdlm_denominators(noise, oc)
  cp = compute_params(params, c)
  fn = lambda d: obj.bdlm_sums(cp, c, d[0], d[1], denoms, oc)[1]
  if spec.accum == 1:
    sums = fn((batch, noise))
  else:  # the training step's micro-batches: the same peak memory as training
    per = jax.lax.map(fn, micro_batches((batch, noise), spec.accum))
    sums = jax.tree_util.tree_map(lambda x: x.sum(0), per)
  metrics = obj.bdlm_metrics(sums, denoms, oc)
  return {k: v for k, v in metrics.items() if k not in ("expert_tokens",)}


STEPS: dict[str, Callable] = {"bdlm": bdlm_step, "dpo": dpo_step, "ebpo": ebpo_step}


# ---- compiled steps -------------------------------------------------------------------------
def shardings_of(tree) -> Any:
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


class CompiledSteps:
  """One jitted program per (stage, StepSpec): in/out shardings from the train state and the
  first arguments seen, the state donated, metrics replicated."""

  def __init__(self, stage: str, optimizer, state_shardings, mesh, rows_spec=None):
    self.stage, self.optimizer = stage, optimizer
    self.state_shardings, self.mesh, self.rows_spec = state_shardings, mesh, rows_spec
    self._cache: dict = {}

  def _jitted(self, spec: StepSpec, batch, extra):
    fn = self._cache.get(spec)
    if fn is None:
      rep = NamedSharding(self.mesh, P())
      body = STEPS[self.stage]
      f = lambda s, b, k, x: body(spec, self.optimizer, s, b, k, x, rows_spec=self.rows_spec)
      fn = self._cache[spec] = jax.jit(
          f, in_shardings=(self.state_shardings, shardings_of(batch), rep, shardings_of(extra)),
          out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    return fn

  def __call__(self, spec: StepSpec, state, batch, key, extra=None):
    fn = self._jitted(spec, batch, extra)
    with jax.set_mesh(self.mesh):
      return fn(state, batch, key, extra)

  def lower(self, spec: StepSpec, state, batch, key, extra=None):
    """The step's `jax.stages.Lowered` for (abstract) arguments carrying shardings: the very
    program `__call__` runs (memory analysis, export)."""
    fn = self._jitted(spec, batch, extra)
    with jax.set_mesh(self.mesh):
      return fn.lower(state, batch, key, extra)

  def evaluate(self, spec: StepSpec, params, batch, key) -> dict:
    """`bdlm_eval` jitted with the params' and the batch's shardings (metrics replicated)."""
    fn = self._cache.get(("eval", spec))
    if fn is None:
      rep = NamedSharding(self.mesh, P())
      fn = self._cache[("eval", spec)] = jax.jit(
          functools.partial(bdlm_eval, spec),
          in_shardings=(self.state_shardings["params"], shardings_of(batch), rep),
          out_shardings=rep)
    with jax.set_mesh(self.mesh):
      return fn(params, batch, key)
