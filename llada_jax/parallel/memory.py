"""Per-device memory plan of a config on a mesh: params, gradients, optimizer state, activations
(with and without per-layer rematerialisation), logits and the decode KV cache.

Params, gradients and optimizer state are exact (their shardings come from the rules).
Activations are an analytic estimate of what the backward pass keeps, per token:

  * per layer (kept for the backward without remat): the norm outputs, qkv, q/k after
    norm and RoPE, the attention output and projection, the residual sums, and the FFN's
    inputs/intermediates (dense SwiGLU, or router scores + K routed copies through the experts'
    SwiGLU + the shared expert); the XLA attention keeps its fp32 scores and the probabilities
    (`[H, T]` per token) unless `flash_attention` (a kernel that keeps only the log-sum-exp);
  * with remat only each layer's input is kept, plus one layer's intermediates at a time;
  * the backward pass adds one layer's worth of gradients of those intermediates;
  * the fp32 logits, their log-softmax and its gradient.

Token counts per device follow the activation rules (batch split over the batch axes); head,
MLP and vocab widths are divided by the mesh axes their rules give them when divisible. The
expert-parallel dispatch buffers are counted for the configured path. The estimate leaves out
XLA's own temporaries and fragmentation: keep ~10-20% headroom. `llada_jax.train.plan` applies
it to a training config (the real train state, the objective's token layout, micro-batches);
`tests/test_train_plan.py` compares it with XLA's compiled memory analysis of the trainer's own
step on CPU. (XLA:CPU's scheduler is not memory-aware, so its remat figure is no reference.)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.model import params as params_lib
from llada_jax.model.kv_cache import capacity as kv_capacity
from llada_jax.parallel.expert_parallel import capacity as ep_capacity, ragged_buffer_rows
from llada_jax.parallel.mesh import mesh_shape
from llada_jax.parallel.rules import (activation_spec, logical_to_spec, normalize_rules,
                                      param_partition_specs, per_device_bytes, shard_count,
                                      spec_axes)

GiB = 1024 ** 3
HBM = {"v5e": 16 * GiB, "v6e": 32 * GiB, "v5p": 95 * GiB}


@dataclasses.dataclass(frozen=True)
class Workload:
  batch: int = 8
  seq: int = 4096  # training / forward sequence length
  prompt: int = 256  # decode
  gen: int = 256
  block_length: int = 32
  optimizer_states: int = 2  # AdamW: mu and nu
  optimizer_dtype: str = "float32"
  master_fp32: bool = False  # an fp32 copy of bf16 params (mixed-precision training)
  flash_attention: bool = False
  dispatch: str = "ragged"  # expert-parallel path: "dense" or "ragged"
  capacity_factor: float = 0.0  # 0 = worst-case dispatch buffers (dropless)
  # Forward tokens per training token: 2 for the BDLM 2L layout `[x_t ; x_0]` (every block
  # smaller than the sequence), 1 for AR-with-mask / MDLM; logits are taken on `seq` tokens.
  copies: int = 1


def _entry(spec):
  return spec[0] if len(spec) else None


def _width(name: str, n: int, sizes, rules) -> int:
  """`n` divided by the mesh axes the rule of logical axis `name` gives it (if they divide)."""
  axes = spec_axes(_entry(logical_to_spec((name,), (n,), sizes, rules)))
  return n // math.prod(sizes[a] for a in axes)


def plan(c: ModelConfig, mesh, w: Workload = Workload(), rules=None) -> dict[str, float]:
  """Bytes per device by component (see the module doc). Keys:
  params, grads, optimizer, activations_remat, activations_no_remat, logits, kv_cache,
  decode_activations, and the totals train_remat, train_no_remat, inference."""
  rules = normalize_rules(rules)
  sizes = dict(mesh) if isinstance(mesh, dict) else mesh_shape(mesh)
  shapes = params_lib.param_shapes(c)
  specs = param_partition_specs(c, sizes, rules)
  params = per_device_bytes(shapes, specs, sizes)
  fp32_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32),
                                       shapes)
  n_params_local = per_device_bytes(fp32_shapes, specs, sizes) // 4  # elements per device
  opt = n_params_local * np.dtype(w.optimizer_dtype).itemsize * w.optimizer_states
  if w.master_fp32 and np.dtype(c.param_dtype).itemsize < 4:
    opt += n_params_local * 4
  act = np.dtype(c.dtype).itemsize
  D, d, H, KV = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
  E, K = c.num_experts, c.num_experts_per_tok

  # tokens per device: the batch split of the residual stream
  hidden_spec = activation_spec("hidden", (w.batch, w.seq, D), sizes, rules)
  tok = w.batch * w.seq // shard_count(hidden_spec, sizes)
  heads = _width("heads", H, sizes, rules)
  kv_heads = _width("kv_heads", KV, sizes, rules)
  qkv = _width("qkv", (H + 2 * KV) * d, sizes, rules)
  inter = _width("mlp", c.intermediate_size, sizes, rules)
  f = _width("expert_mlp", c.moe_intermediate_size, sizes, rules)
  fs = _width("mlp", c.shared_intermediate_size, sizes, rules) if c.shared_intermediate_size else 0
  vocab = _width("act_vocab", c.vocab_size, sizes, rules)

  def attention_per_token(keys: int) -> float:
    kept = (2 * D + qkv + 2 * (heads + kv_heads) * d + heads * d + 3 * D) * act
    if not w.flash_attention:
      kept += heads * keys * (4 + act)  # fp32 scores + probabilities
    else:
      kept += heads * 4  # log-sum-exp
    return kept

  def attention_backward_per_token(keys: int) -> float:
    """What the attention's backward adds for the layer being differentiated: the fp32
    gradients of the probabilities and of the scores (none with a flash kernel)."""
    return 0 if w.flash_attention else heads * keys * 4 * 2

  # FFN bytes per device of one layer, for `n` tokens per device
  def dense_ffn(n: int) -> float:
    return n * (3 * inter + D) * act

  # The MoE splits its tokens over every mesh axis except the experts' F axes (see
  # expert_parallel), and moves K copies of each through the experts' SwiGLU.
  f_axes = set(spec_axes(_entry(logical_to_spec(("expert_mlp",), (c.moe_intermediate_size,),
                                                sizes, rules))))
  moe_shards = math.prod(v for k, v in sizes.items() if k not in f_axes)
  ep = math.prod(sizes[a] for a in spec_axes(_entry(logical_to_spec(("expert",), (E,), sizes,
                                                                    rules))))
  e_loc = E // ep

  def moe_ffn(n: int, n_global: int) -> float:
    local = -(-n_global // moe_shards)
    if w.dispatch == "dense":
      rows = 2 * E * ep_capacity(local, K, E, w.capacity_factor)  # send + receive buffers
    else:
      rows = local * K + ragged_buffer_rows(local, K, ep, e_loc, w.capacity_factor)
    routed = rows * (2 * D + 3 * f) * act
    return n * E * 4 * 3 + routed + (n * (3 * fs + D) * act if fs else 0)

  def layer(kind: str, n: int, n_global: int, keys: int) -> float:
    ffn = dense_ffn(n) if kind == "dense" else moe_ffn(n, n_global)
    return n * attention_per_token(keys) + ffn

  kinds = [(k, n) for k, n in (("dense", c.num_dense_layers), ("moe", c.num_moe_layers)) if n]
  logit_tok = tok  # logits (and the loss) are on the first `seq` tokens of each row
  n_all, keys = w.batch * w.seq * w.copies, w.seq * w.copies
  tok = tok * w.copies
  biggest = max(layer(k, tok, n_all, keys) for k, _ in kinds)
  # the backward holds one layer's gradients of its intermediates on top of what is kept
  biggest_backward = biggest + tok * attention_backward_per_token(keys)
  no_remat = sum(n * layer(k, tok, n_all, keys) for k, n in kinds) + biggest_backward
  remat = tok * c.num_hidden_layers * D * act + biggest + biggest_backward
  logits = logit_tok * vocab * 4 * 3  # fp32 logits, log-softmax, gradient

  # decode: the KV cache of the canvas and one window's forward against it
  from llada_jax.decode.api import prompt_bucket  # noqa: PLC0415 (decode imports the model)
  bl = w.block_length
  canvas = prompt_bucket(w.prompt, bl) + -(-w.gen // bl) * bl
  cache_shape = (c.num_hidden_layers, w.batch, KV, kv_capacity(canvas), d)  # kv_cache layout
  cache_spec = activation_spec("kv_cache", cache_shape, sizes, rules)
  kv_cache = 2 * math.prod(cache_shape) * act // shard_count(cache_spec, sizes)
  win_spec = activation_spec("hidden", (w.batch, bl, D), sizes, rules)
  win_tok = w.batch * bl // shard_count(win_spec, sizes)
  decode_act = (max(layer(k, win_tok, w.batch * bl, canvas + bl) for k, _ in kinds)
                + win_tok * vocab * 4 * 2)
  out = dict(params=params, grads=params, optimizer=opt, activations_remat=remat,
             activations_no_remat=no_remat, logits=logits, kv_cache=kv_cache,
             decode_activations=decode_act)
  base = params * 2 + opt + logits
  out.update(train_remat=base + remat, train_no_remat=base + no_remat,
             inference=params + kv_cache + decode_act)
  return out


def fits(total: float, hbm: float, headroom: float = 0.1) -> bool:
  return total <= hbm * (1 - headroom)
