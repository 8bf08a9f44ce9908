"""RMSNorm, partial RoPE, SwiGLU and GQA attention: pure functions of (params, activations)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite "minus infinity": a query that sees no key gets a uniform (ignored) row, never NaN.
NEG_INF = -1e30


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """HF LLaDA2 RMSNorm: normalise in float32, cast back to x.dtype, then scale by weight."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, rotary_dim: int, theta: float, dtype) -> tuple:
  """cos/sin `[B, T, rotary_dim]` for absolute `positions` `[B, T]` (NeoX layout)."""
  exponent = jnp.arange(0, rotary_dim, 2, dtype=jnp.int32).astype(jnp.float32) / rotary_dim
  inv_freq = 1.0 / (theta ** exponent)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first `rotary_dim` features of each head of x `[B, T, N, d]` (rotate_half)."""
  r = cos.shape[-1]
  rot, rest = x[..., :r], x[..., r:]
  x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """`down(silu(x @ gate) * (x @ up))` with `[in, out]` weights."""
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum(spec, a, b)` accumulated and returned in float32. On CPU, 16-bit operands are
  upcast first: XLA:CPU has no batched BF16 x BF16 = F32 dot ("Unsupported element type for
  DotThunk", e.g. the attention of a batch of 2); the products of 16-bit floats are exact in
  float32, so the result is the same. Other platforms keep the 16-bit operands."""
  dot = lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  if a.dtype.itemsize >= 4 and b.dtype.itemsize >= 4:
    return dot(a, b)
  up = lambda x, y: dot(x.astype(jnp.float32), y.astype(jnp.float32))
  return jax.lax.platform_dependent(a, b, cpu=up, default=dot)


def _grouped(q: jax.Array, kv: int) -> jax.Array:
  """Queries `[B, Tq, H, d]` as `[B, KV, G * Tq, d]` (G = H // KV query heads per KV head), so
  that every score and PV product is one plain batched matmul over (B, KV)."""
  b, tq, h, d = q.shape
  return q.reshape(b, tq, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, d)


def _scores(qg: jax.Array, k: jax.Array, mask: jax.Array, g: int) -> jax.Array:
  """Scaled, masked float32 scores `[B, KV, G, Tq, S]` of grouped queries against keys
  `[B, KV, S, d]`; mask `[B, Tq, S]`."""
  b, kv, gq, d = qg.shape
  s = _einsum_f32("bkqd,bksd->bkqs", qg, k).reshape(b, kv, g, gq // g, -1)
  return jnp.where(mask[:, None, None], s * (d ** -0.5), NEG_INF)


def _softmax_pv(scores: list, values: list, dtype) -> jax.Array:
  """softmax over the concatenation of the key segments' `scores` `[B, KV, G, Tq, S_i]`, times
  their `values` `[B, KV, S_i, d]`, without concatenating: one running max, the exponentials'
  PV products summed in float32 and divided by the softmax denominator at the end (one pass
  over the scores fewer than normalising the probabilities). Returns `[B, Tq, H, d]`."""
  mx = functools.reduce(jnp.maximum, [jnp.max(s, -1, keepdims=True, initial=NEG_INF)
                                      for s in scores])
  p = [jnp.exp(s - mx) for s in scores]
  denom = sum(jnp.sum(x, -1, keepdims=True) for x in p)
  out = sum(_einsum_f32("bkgqs,bksd->bkgqd", x.astype(dtype), v) for x, v in zip(p, values))
  b, kv, g, tq, d = out.shape
  out = (out / denom).astype(dtype)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, kv * g, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention (XLA path).

  Args:
    q: `[B, Tq, H, d]` queries; k, v: `[B, Tk, KV, d]` keys/values; H a multiple of KV
      (query head h uses kv head h // (H // KV)).
    mask: `[B, Tq, Tk]` bool, True where the query may attend the key.
  Returns: `[B, Tq, H, d]` in q.dtype. Scores and softmax in float32, scale d^-0.5; the PV
  product takes the unnormalised exponentials in q.dtype and is divided by the softmax
  denominator in float32.
  """
  kv = k.shape[2]
  g = q.shape[2] // kv
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return _softmax_pv([_scores(_grouped(q, kv), kt, mask, g)], [vt], q.dtype)


def attention_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                         cache_k: jax.Array, cache_v: jax.Array,
                         cache_mask: jax.Array) -> jax.Array:
  """`attention` over the keys [cache ; window] without concatenating K/V (XLA path).

  Args:
    q: `[B, Tq, H, d]`; k, v: `[B, Tw, KV, d]` the window's keys/values; mask `[B, Tq, Tw]`.
    cache_k, cache_v: `[B, KV, S, d]` (the cache's layout, `model.kv_cache`); cache_mask
      `[B, Tq, S]`.
  Returns: `[B, Tq, H, d]` in q.dtype. The scores against the cache and against the window are
  computed separately (the cache is never concatenated with the window; a 16-bit cache on CPU is
  upcast by `_einsum_f32`) and share one softmax (`_softmax_pv`).
  """
  kv = k.shape[2]
  g = q.shape[2] // kv
  qg = _grouped(q, kv)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return _softmax_pv([_scores(qg, cache_k, cache_mask, g), _scores(qg, kt, mask, g)],
                     [cache_v, vt], q.dtype)
