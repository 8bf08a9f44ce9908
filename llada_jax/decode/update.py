"""One denoising step's rule (the jnp reference of the fused update kernel) and the sampler.

Shapes: B rows, W window positions, V vocabulary.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array | None, temperature, top_k, top_p,
           *, greedy: bool) -> tuple[jax.Array, jax.Array]:
  """Token and confidence per position (SPEC 4.1).

  Args:
    logits: `[B, W, V]` float32. key: `[B, 2]` uint32 per-row keys (unused when greedy).
    temperature, top_k, top_p: traced scalars (top_k 0 / top_p 1.0 = off).
    greedy: static; True is temperature 0 (argmax, confidence = softmax prob of it).
  Returns: tokens `[B, W]` int32, confidence `[B, W]` float32.
  """
  if greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)
    return tok, jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]
  x = logits / jnp.where(temperature > 0, temperature, 1.0)
  srt = jnp.sort(x, axis=-1)[..., ::-1]
  v = x.shape[-1]
  kth = jnp.take_along_axis(srt, jnp.clip(top_k - 1, 0, v - 1)[None, None, None]
                            * jnp.ones(x.shape[:-1] + (1,), jnp.int32), axis=-1)
  x = jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)
  # top-p: drop tokens once the cumulative probability of strictly better tokens exceeds p.
  srt = jnp.sort(x, axis=-1)[..., ::-1]
  cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
  remove_sorted = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), cum[..., :-1] > top_p],
                                  axis=-1)
  cutoff = jnp.min(jnp.where(remove_sorted, jnp.inf, srt), axis=-1, keepdims=True)
  x = jnp.where((top_p < 1.0) & (x < cutoff), -jnp.inf, x)
  probs = jax.nn.softmax(x, axis=-1)
  tok = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(key, x).astype(jnp.int32)
  return tok, jnp.take_along_axis(probs, tok[..., None], axis=-1)[..., 0]


def topk_mask(score: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
  """`[B, W]` bool: the min(k, #candidates) candidates with the highest score (ties: lower
  index first, as `lax.top_k`). `k` `[B]` int32 (traced)."""
  s = jnp.where(candidates, score, -jnp.inf)
  si, sj = s[:, :, None], s[:, None, :]
  idx = jnp.arange(s.shape[1])
  better = (sj > si) | ((sj == si) & (idx[None, None, :] < idx[None, :, None]))
  rank = jnp.sum(better & candidates[:, None, :], axis=-1)
  return candidates & (rank < k[:, None])


def update_block(old: jax.Array, tok: jax.Array, conf: jax.Array, masked: jax.Array,
                 editable: jax.Array, threshold, editing_threshold, min_fill: jax.Array):
  """The joint Mask-to-Token + Token-to-Token rule of one step (SPEC 4.2, 4.3).

  Args:
    old: `[B, W]` window tokens before the step. tok, conf: `[B, W]` sampler output.
    masked: `[B, W]` positions holding the mask token. editable: `[B, W]` non-prompt, decoded
      positions that T2T may rewrite. threshold, editing_threshold: `[B]` or scalars.
    min_fill: `[B]` int32 fallback count: if fewer than this many masks pass the threshold, the
      best min(min_fill, #masked) masks are filled instead (LLaDA2.1 num_to_transfer, LLaDA2.0
      the per-step schedule).
  Returns: new tokens `[B, W]`, m2t `[B, W]` bool, t2t `[B, W]` bool.
  """
  threshold = jnp.asarray(threshold)[..., None] if jnp.ndim(threshold) else threshold
  editing_threshold = (jnp.asarray(editing_threshold)[..., None] if jnp.ndim(editing_threshold)
                       else editing_threshold)
  hi = masked & (conf > threshold)
  enough = jnp.sum(hi, axis=-1) >= min_fill
  m2t = jnp.where(enough[:, None], hi, topk_mask(conf, masked, min_fill))
  t2t = (~masked) & editable & (conf > editing_threshold) & (tok != old)
  new = jnp.where(m2t | t2t, tok, old)
  return new, m2t, t2t


# impl(old, tok, conf, masked, editable, threshold, editing_threshold, min_fill) -> same as
# `update_block`. Other implementations (the fused Pallas kernel) register themselves.
UPDATE_IMPLS = {"jnp": update_block}
_LAZY_UPDATE = {"pallas": "llada_jax.kernels", "pallas_tpu": "llada_jax.kernels"}


def register_update(name: str, fn) -> None:
  UPDATE_IMPLS[name] = fn


def update_names() -> list[str]:
  return sorted(set(UPDATE_IMPLS) | set(_LAZY_UPDATE))


def get_update(name: str):
  if name not in UPDATE_IMPLS and name in _LAZY_UPDATE:
    importlib.import_module(_LAZY_UPDATE[name])
  if name not in UPDATE_IMPLS:
    raise ValueError(f"unknown update_impl {name!r}; choose from {update_names()}")
  return UPDATE_IMPLS[name]
