"""The LLaDA2 MoE transformer as a pure function of (params, config, tokens, layout, cache)."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from llada_jax import masks
from llada_jax.config import ModelConfig
from llada_jax.model import layers
from llada_jax.model.moe import moe_block
from llada_jax.model.params import Params

# The attention protocol:
#   attention_fn(q [B,Tq,H,d], k [B,Tk,KV,d], v, q_layout [B,Tq], k_layout [B,Tk], *,
#                cache_k=None, cache_v=None, cache_layout=None, cache_index=None) -> [B,Tq,H,d]
# k, v are the keys/values of the tokens themselves (described by k_layout). With a KV cache
# the cache is passed as its own operands, never concatenated with k, v: cache_k, cache_v the
# whole stacked cache of a layer stack `[L, B, KV, S, d]` (`model.kv_cache`'s layout) with
# cache_index the layer (an int32 scalar), or one layer's `[B, KV, S, d]` with cache_index
# None; cache_layout `[B, S]` describes the slots. The keys are then [cache ; k], the mask
# `masks.visible(q_layout, cache_layout.concat(k_layout))`. Implementations registered with
# `register_attention` must accept the cache keywords.
AttentionFn = Callable[..., jax.Array]


def cache_layer(cache: jax.Array, cache_index) -> jax.Array:
  """One layer `[B, KV, S, d]` of a stacked cache `[L, B, KV, S, d]` (or the array itself when
  `cache_index` is None)."""
  if cache_index is None:
    return cache
  return jax.lax.dynamic_index_in_dim(cache, cache_index, axis=0, keepdims=False)


def xla_attention(q, k, v, q_layout: masks.Layout, k_layout: masks.Layout, *, cache_k=None,
                  cache_v=None, cache_layout: masks.Layout | None = None,
                  cache_index=None) -> jax.Array:
  if cache_k is None:
    return layers.attention(q, k, v, masks.visible(q_layout, k_layout))
  ck, cv = cache_layer(cache_k, cache_index), cache_layer(cache_v, cache_index)
  return layers.attention_with_cache(q, k, v, masks.visible(q_layout, k_layout),
                                     ck.astype(k.dtype), cv.astype(v.dtype),
                                     masks.visible(q_layout, cache_layout))


ATTENTION_IMPLS: dict[str, AttentionFn] = {"xla": xla_attention}
# Implementations living in other packages, imported (and registered) on first use.
_LAZY_ATTENTION = {"pallas": "llada_jax.kernels", "pallas_tpu": "llada_jax.kernels"}
# Names standing for another implementation, chosen by the default backend when resolved.
_ALIASES = {"auto": lambda: "pallas_tpu" if jax.default_backend() == "tpu" else "xla"}


def register_attention(name: str, fn: AttentionFn) -> None:
  """Makes `attention_impl=name` available to `forward` (used by the kernels package); `fn`
  follows the attention protocol above (cache keywords included)."""
  ATTENTION_IMPLS[name] = fn


def attention_names() -> list[str]:
  return sorted(set(ATTENTION_IMPLS) | set(_LAZY_ATTENTION) | set(_ALIASES))


def resolve_attention(name: str) -> str:
  """The implementation a name stands for: "auto" is the Pallas TPU kernel ("pallas_tpu") on
  a TPU backend and "xla" elsewhere; every other name stands for itself."""
  return _ALIASES[name]() if name in _ALIASES else name


def get_attention(name: str) -> AttentionFn:
  name = resolve_attention(name)
  if name not in ATTENTION_IMPLS and name in _LAZY_ATTENTION:
    importlib.import_module(_LAZY_ATTENTION[name])
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {name!r}; choose from {attention_names()}")
  return ATTENTION_IMPLS[name]


@flax.struct.dataclass
class ForwardOutput:
  """What one forward returns. Shapes: B batch, T tokens, L layers of a stack."""

  logits: jax.Array | None  # [B, T, V] float32, None when not requested
  kv: dict  # {stack: {"k", "v": [L, B, T, KV, d]}} keys/values of the input tokens
  hidden_states: jax.Array | None = None  # [num_layers + 1, B, T, D] (HF convention)
  router_logits: jax.Array | None = None  # [num_moe_layers, B, T, E] float32
  router_idx: jax.Array | None = None  # [num_moe_layers, B, T, K] int32
  final_hidden: jax.Array | None = None  # [B, T, D] after the final norm (with_hidden=True)


def _cast(tree: Any, dtype) -> Any:
  def f(path, x):
    if any(getattr(k, "key", None) == "router" for k in path):
      return x
    return x.astype(dtype)
  return jax.tree_util.tree_map_with_path(f, tree)


def _layer(c: ModelConfig, kind: str, attention_fn: AttentionFn, moe_impl: str,
           x, p, cos, sin, q_layout, k_layout, cache_kv, expert_layer=None):
  """One decoder layer on x `[B, T, D]`; returns (x, (k, v, router_logits, router_idx)).

  `cache_kv`: None, or (cache_k, cache_v `[L, B, KV, S, d]` of the stack, this layer's index,
  cache_layout) handed to the attention as its cache operands (read in place).
  `expert_layer`: None, or this layer's index when `p["experts"]` holds the whole stack (read in
  place by `moe_block`)."""
  b, t, _ = x.shape
  h_, kv_, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
  eps = c.rms_norm_eps
  h = layers.rms_norm(x, p["input_norm"], eps)
  qkv = (h @ p["attn"]["qkv"]).reshape(b, t, h_ + 2 * kv_, d)
  q, k, v = qkv[:, :, :h_], qkv[:, :, h_:h_ + kv_], qkv[:, :, h_ + kv_:]
  if c.use_qk_norm:
    q = layers.rms_norm(q, p["attn"]["q_norm"], eps)
    k = layers.rms_norm(k, p["attn"]["k_norm"], eps)
  q = layers.apply_partial_rope(q, cos, sin)
  k = layers.apply_partial_rope(k, cos, sin)
  if cache_kv is not None:
    cache_k, cache_v, index, cache_layout = cache_kv
    o = attention_fn(q, k, v, q_layout, k_layout, cache_k=cache_k, cache_v=cache_v,
                     cache_layout=cache_layout, cache_index=index)
  else:
    o = attention_fn(q, k, v, q_layout, k_layout)
  x = x + o.reshape(b, t, h_ * d) @ p["attn"]["out"]
  h = layers.rms_norm(x, p["post_norm"], eps)
  if kind == "dense":
    m = p["mlp"]
    y, rl, ri = layers.swiglu(h, m["gate"], m["up"], m["down"]), None, None
  else:
    y, rl, ri = moe_block(p, h, c, impl=moe_impl, layer=expert_layer)
  return x + y, (k, v, rl, ri)


def forward_core(params: Params, c: ModelConfig, tokens: jax.Array, positions: jax.Array,
                 layout: masks.Layout, *, cache: dict | None = None,
                 cache_layout: masks.Layout | None = None, with_logits: bool = True,
                 collect: bool = False, attention_impl: str = "xla",
                 moe_impl: str = "ragged", logits_slice: tuple[int, int] | None = None,
                 embed_delta: jax.Array | None = None, remat: bool = False,
                 with_hidden: bool = False, experts_in_place: bool = False) -> ForwardOutput:
  """Runs the model on `tokens` `[B, T]` at absolute `positions` `[B, T]`.

  Keys are the cache slots (described by `cache_layout`, `[B, S]`) followed by the tokens
  themselves (described by `layout`); `masks.visible` decides who sees whom. The cache
  (`model.kv_cache`, leaves `[L, B, KV, S, d]`) is read in place by the attention (each layer
  gets the stacked arrays and its index), and `kv` returns the tokens' own K/V.
  `collect=True` also returns per-layer hidden states and router outputs.
  `logits_slice=(a, b)` computes logits for tokens a..b only (e.g. the noisy half in training).
  `embed_delta` `[B, T, D]` is added to the embedding output (noise on masked embeddings).
  `remat=True` rematerialises each layer in the backward pass (activation memory ~ one layer).
  `with_hidden=True` also returns the final-normed hidden states `final_hidden` (for a sampler
  fused with the LM head; with `with_logits=False` no logits are computed).
  `experts_in_place=True` (inference: not differentiable) keeps the routed experts' weights out
  of the scan over layers: each layer's expert implementation reads its experts from the
  stacked `[L, E, ...]` arrays by index instead of a per-layer slice (a copy of every expert's
  weights per layer and call on XLA:CPU). Same results.
  """
  dtype = jnp.dtype(c.dtype)
  p = _cast(params, dtype)
  attention_fn = get_attention(attention_impl)
  if cache is not None and cache_layout is None:
    raise ValueError("a cache needs its cache_layout")
  cos, sin = layers.rope_cos_sin(positions, c.rotary_dim, c.rope_theta, dtype)
  x = p["embed"][tokens].astype(dtype)
  if embed_delta is not None:
    x = x + embed_delta.astype(dtype)
  hidden = [x] if collect else None
  kv, router_logits, router_idx = {}, None, None
  for kind in ("dense", "moe"):
    if kind not in p:
      continue
    body = functools.partial(_layer, c, kind, attention_fn, moe_impl)

    # The stacked cache is a loop invariant of the scan (not sliced per layer as xs): each
    # layer's attention reads its layer in place, by index.
    stack_cache = None if cache is None else (cache[kind]["k"], cache[kind]["v"])

    layer_params = dict(p[kind])
    in_place = experts_in_place and kind == "moe"
    stack_experts = layer_params.pop("experts") if in_place else None

    def step(x, xs, body=body, stack_cache=stack_cache, stack_experts=stack_experts):
      lp, index = xs
      ckv = None if stack_cache is None else (*stack_cache, index, cache_layout)
      if stack_experts is not None:
        lp = {**lp, "experts": stack_experts}
      x, (k, v, rl, ri) = body(x, lp, cos, sin, layout, layout, ckv,
                               None if stack_experts is None else index)
      return x, (k, v, rl, ri, x if collect else None)

    if remat:
      step = jax.checkpoint(step)
    n_layers = jax.tree_util.tree_leaves(p[kind])[0].shape[0]
    x, (k, v, rl, ri, hs) = jax.lax.scan(
        step, x, (layer_params, jnp.arange(n_layers, dtype=jnp.int32)))
    kv[kind] = {"k": k, "v": v}
    if collect:
      hidden.extend(list(hs))
    if kind == "moe":
      router_logits, router_idx = rl, ri
  x = layers.rms_norm(x, p["final_norm"], c.rms_norm_eps)
  logits = None
  if with_logits:
    xs = x if logits_slice is None else x[:, logits_slice[0]:logits_slice[1]]
    logits = jnp.dot(xs, p["lm_head"]).astype(jnp.float32)
  hs = None
  if collect:
    hs = jnp.stack(hidden[:-1] + [x])  # HF: the last entry is the final-normed state
  return ForwardOutput(logits=logits, kv=kv, hidden_states=hs, router_logits=router_logits,
                       router_idx=router_idx,
                       final_hidden=x if with_hidden else None)


@functools.partial(jax.jit, static_argnames=("c", "block_length", "attention_impl", "moe_impl",
                                             "collect"))
def _forward_jit(params, c, input_ids, position_ids, *, block_length, attention_impl, moe_impl,
                 collect):
  b, t = input_ids.shape
  layout = masks.from_block_length(b, t, block_length)
  return forward_core(params, c, input_ids, position_ids, layout, collect=collect,
                      attention_impl=attention_impl, moe_impl=moe_impl)


def _check_ids(c: ModelConfig, input_ids) -> jax.Array:
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
  if input_ids.shape[1] > c.max_position_embeddings:
    raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                     f"{c.max_position_embeddings}")
  return input_ids.astype(jnp.int32)


def forward(params: Params, config: ModelConfig, input_ids, *, block_length: int | None = None,
            position_ids=None, attention_impl: str = "auto", moe_impl: str = "auto",
            return_all: bool = False, mesh=None, rules=None):
  """Logits `[B, T, V]` float32 of `input_ids` `[B, T]`.

  `block_length=None` is fully bidirectional attention; an integer gives the block-causal
  inference mask of that block length. `position_ids` default to `arange(T)`.
  With `return_all=True` returns the whole `ForwardOutput` (hidden states, router outputs).
  `mesh` (None, "auto", a spec such as "data=2,expert=4", or a `Mesh`; see
  `llada_jax.parallel.resolve_mesh`) runs under that mesh: params placed by the logical-axis
  `rules` (a no-op when they already are), rows split over the batch axes, and with
  `moe_impl="auto"` the experts expert-parallel (see `llada_jax.parallel.resolve_moe_impl`).
  """
  input_ids = _check_ids(config, input_ids)
  b, t = input_ids.shape
  if block_length is not None and (not isinstance(block_length, int) or block_length <= 0):
    raise ValueError(f"block_length must be a positive integer or None, got {block_length!r}")
  get_attention(attention_impl)  # raises on an unknown name
  if position_ids is None:
    position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  position_ids = jnp.broadcast_to(jnp.asarray(position_ids, jnp.int32), (b, t))
  from llada_jax import parallel  # noqa: PLC0415 (parallel imports the model)
  mesh = parallel.resolve_mesh(mesh, config, rules=rules)
  moe_impl = parallel.resolve_moe_impl(moe_impl, mesh, rules)
  with parallel.mesh_context(mesh):
    if mesh is not None:
      params = parallel.shard_params(params, config, mesh, rules)
      tok = parallel.activation_sharding("tokens", (b, t), mesh, rules)
      input_ids, position_ids = parallel.put((input_ids, position_ids), (tok, tok))
    out = _forward_jit(params, config, input_ids, position_ids, block_length=block_length,
                       attention_impl=attention_impl, moe_impl=moe_impl, collect=return_all)
  return out if return_all else out.logits
