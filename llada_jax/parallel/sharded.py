"""The model's forward and decoding run under a mesh, with params sharded by the rules."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.parallel import expert_parallel as ep_lib
from llada_jax.parallel.rules import activation_sharding, normalize_rules, put, shard_params


def resolve_moe_impl(moe_impl, rules=None) -> str:
  """A `moe_impl` name: an `EPConfig` is registered; the built-in "ep"/"ep_ragged" follow
  `rules` when they differ from the defaults (so the experts' in-specs match the params)."""
  if isinstance(moe_impl, ep_lib.EPConfig):
    return ep_lib.register_ep(moe_impl)
  if rules is not None and moe_impl in ep_lib._BUILTIN:
    cfg = ep_lib._BUILTIN[moe_impl]
    rules = normalize_rules(rules)
    if rules != cfg.rules:
      return ep_lib.register_ep(dataclasses.replace(cfg, rules=rules))
  return moe_impl


def sharded_forward(params, config: ModelConfig, input_ids, mesh, *, rules=None,
                    moe_impl="ep", **kw):
  """`llada_jax.forward` under `mesh`: params placed by the rules (a no-op when they already
  are), input ids split over the batch axes, MoE expert-parallel (`moe_impl`, default "ep").
  Other keywords go to `forward` (block_length, position_ids, attention_impl, return_all)."""
  from llada_jax.model.transformer import forward  # noqa: PLC0415
  params = shard_params(params, config, mesh, rules)
  ids = jnp.asarray(input_ids, jnp.int32)
  ids = put(ids, activation_sharding("tokens", ids.shape, mesh, rules))
  with jax.set_mesh(mesh):
    return forward(params, config, ids, moe_impl=resolve_moe_impl(moe_impl, rules), **kw)


def sharded_generate(params, config: ModelConfig, prompts, mesh, *, rules=None, moe_impl="ep",
                     **kw):
  """`llada_jax.generate` under `mesh` with params placed by the rules (see `generate`)."""
  from llada_jax.decode import generate  # noqa: PLC0415
  params = shard_params(params, config, mesh, rules)
  with jax.set_mesh(mesh):
    return generate(params, config, prompts, moe_impl=resolve_moe_impl(moe_impl, rules), **kw)
