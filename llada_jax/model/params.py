"""The params pytree of a LLaDA2 model: layout, shapes, logical axes and random init.

Layout (a nested dict of arrays; matrices are stored `[in, out]`, i.e. HF weights transposed):

  embed                  [V, D]
  final_norm             [D]
  lm_head                [D, V]
  dense / moe            one stack each, leading axis = layer (Ld = first_k_dense_replace layers,
                         Lm = the rest); absent when empty:
    input_norm           [L, D]
    post_norm            [L, D]
    attn.qkv             [L, D, (H + 2 KV) * d]     columns: q heads | k heads | v heads
    attn.q_norm          [L, d]
    attn.k_norm          [L, d]
    attn.out             [L, H * d, D]
  dense only:
    mlp.gate / mlp.up    [Ld, D, I]
    mlp.down             [Ld, I, D]
  moe only:
    router.weight        [Lm, D, E]    (kept float32: the router runs in fp32)
    router.expert_bias   [Lm, E]       (float32)
    experts.gate / .up   [Lm, E, D, F]
    experts.down         [Lm, E, F, D]
    shared.gate / .up    [Lm, D, F*S]
    shared.down          [Lm, F*S, D]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig

Params = dict[str, Any]

# Leaves that stay float32 whatever `param_dtype` says (the reference keeps them fp32).
FP32_LEAVES = (("router", "weight"), ("router", "expert_bias"))


def _attn_shapes(c: ModelConfig, n: int) -> dict:
  d, h, kv, D = c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size
  return {
      "input_norm": ((n, D), ("layers", "embed")),
      "post_norm": ((n, D), ("layers", "embed")),
      "attn": {
          "qkv": ((n, D, (h + 2 * kv) * d), ("layers", "embed", "qkv")),
          "q_norm": ((n, d), ("layers", "head_dim")),
          "k_norm": ((n, d), ("layers", "head_dim")),
          "out": ((n, h * d, D), ("layers", "heads", "embed")),
      },
  }


def param_specs(c: ModelConfig) -> dict:
  """Nested dict of `(shape, logical_axes)` tuples: the single source of the params layout."""
  D, V = c.hidden_size, c.vocab_size
  specs: dict[str, Any] = {
      "embed": ((V, D), ("vocab", "embed")),
      "final_norm": ((D,), ("embed",)),
      "lm_head": ((D, V), ("embed", "vocab")),
  }
  if c.num_dense_layers:
    n, I = c.num_dense_layers, c.intermediate_size
    specs["dense"] = _attn_shapes(c, n)
    specs["dense"]["mlp"] = {
        "gate": ((n, D, I), ("layers", "embed", "mlp")),
        "up": ((n, D, I), ("layers", "embed", "mlp")),
        "down": ((n, I, D), ("layers", "mlp", "embed")),
    }
  if c.num_moe_layers:
    n, E, F, S = c.num_moe_layers, c.num_experts, c.moe_intermediate_size, c.shared_intermediate_size
    specs["moe"] = _attn_shapes(c, n)
    specs["moe"]["router"] = {
        "weight": ((n, D, E), ("layers", "embed", "router")),
        "expert_bias": ((n, E), ("layers", "router")),
    }
    specs["moe"]["experts"] = {
        "gate": ((n, E, D, F), ("layers", "expert", "embed", "expert_mlp")),
        "up": ((n, E, D, F), ("layers", "expert", "embed", "expert_mlp")),
        "down": ((n, E, F, D), ("layers", "expert", "expert_mlp", "embed")),
    }
    if S:
      specs["moe"]["shared"] = {
          "gate": ((n, D, S), ("layers", "embed", "mlp")),
          "up": ((n, D, S), ("layers", "embed", "mlp")),
          "down": ((n, S, D), ("layers", "mlp", "embed")),
      }
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def leaf_dtype(c: ModelConfig, path: tuple[str, ...]) -> jnp.dtype:
  if tuple(path[-2:]) in FP32_LEAVES:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(c.param_dtype)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(k.key for k in path)


def param_shapes(c: ModelConfig) -> Params:
  """`jax.ShapeDtypeStruct` pytree of the params (no allocation)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jax.ShapeDtypeStruct(s[0], leaf_dtype(c, _path_keys(p))),
      param_specs(c), is_leaf=_is_spec)


def logical_axes(c: ModelConfig) -> Params:
  """Pytree of logical axis-name tuples, one per param (for sharding rules)."""
  return jax.tree_util.tree_map(lambda s: s[1], param_specs(c), is_leaf=_is_spec)


def count_params(c: ModelConfig) -> int:
  """Analytic parameter count from the config (no arrays)."""
  return int(sum(np.prod(s[0]) for s in jax.tree_util.tree_leaves(
      param_specs(c), is_leaf=_is_spec)))


def count_params_analytic(c: ModelConfig) -> int:
  """The same count written out from the architecture formulas (an independent check)."""
  D, V, d = c.hidden_size, c.vocab_size, c.head_dim
  h, kv = c.num_attention_heads, c.num_key_value_heads
  attn = D * (h + 2 * kv) * d + 2 * d + h * d * D + 2 * D
  dense_mlp = 3 * D * c.intermediate_size
  moe = (D * c.num_experts + c.num_experts + 3 * c.num_experts * D * c.moe_intermediate_size
         + 3 * D * c.shared_intermediate_size)
  return (2 * V * D + D + c.num_dense_layers * (attn + dense_mlp)
          + c.num_moe_layers * (attn + moe))


def init_params(c: ModelConfig, key: jax.Array, *, scale: float = 1.0) -> Params:
  """Random params: N(0,1)/sqrt(fan_in) matrices, N(0,1) embeddings, unit norms, zero bias."""
  specs = param_specs(c)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, (shape, axes)), k in zip(leaves, keys):
    names = _path_keys(path)
    dtype = leaf_dtype(c, names)
    if names[-1] in ("input_norm", "post_norm", "final_norm", "q_norm", "k_norm"):
      x = jnp.ones(shape, jnp.float32)
    elif names[-1] == "expert_bias":
      x = jnp.zeros(shape, jnp.float32)
    elif names[-1] == "embed":
      x = jax.random.normal(k, shape, jnp.float32)
    else:
      fan_in = shape[-2]
      x = scale * jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)
    out.append(x.astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def cast_params(params: Params, c: ModelConfig) -> Params:
  """Casts every leaf to its storage dtype under `c` (router leaves stay float32)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.astype(leaf_dtype(c, _path_keys(p))), params)
