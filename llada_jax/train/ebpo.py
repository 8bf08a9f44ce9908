"""EBPO: ELBO-based block-level policy optimisation (SPEC 5.2, 7).

  log rho(y|x) ~= sum_n w_n sum_b [log p_theta(y_b | z_n, x) - log p_old(y_b | z_n, x)]
  J = E[min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)]

z_n is the 2L layout of the response noised at timestep t_n (one forward per t_n), A are
group-normalised rewards of G rollouts per prompt, drawn from our own decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.train.objectives import block_logprobs


@dataclasses.dataclass(frozen=True)
class EBPOConfig:
  group_size: int = 8  # G rollouts per prompt
  num_timesteps: int = 2  # N sampled timesteps per log-ratio
  eps_low: float = 0.2
  eps_high: float = 0.28
  block_length: int = 32
  attention_impl: str = "xla"
  moe_impl: str = "ragged"
  remat: bool = False

  @property
  def impl(self) -> dict:
    return dict(attention_impl=self.attention_impl, moe_impl=self.moe_impl, remat=self.remat)


def group_advantages(rewards: np.ndarray) -> np.ndarray:
  """`[P, G]` rewards -> advantages normalised within each prompt's group."""
  r = np.asarray(rewards, np.float32)
  return (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)


def timestep_masks(key, trainable: jax.Array, n: int):
  """Stratified timesteps t_n in ((n)/N, (n+1)/N] and their masks `[N, B, L]`."""
  kt, ku = jax.random.split(key)
  b = trainable.shape[0]
  t = (jnp.arange(n)[:, None] + jax.random.uniform(kt, (n, b), minval=1e-3)) / n
  masked = trainable[None] & (jax.random.uniform(ku, (n,) + trainable.shape) < t[..., None])
  return t, masked


def policy_block_logprobs(params, c: ModelConfig, batch: dict, masks_n: jax.Array,
                          block_length: int, **impl) -> jax.Array:
  """`[N, B, nb]` per-block log-likelihood terms, one forward per timestep (`impl`:
  attention_impl, moe_impl, remat)."""
  return jax.lax.map(lambda m: block_logprobs(params, c, batch, m, block_length, **impl),
                     masks_n)


def ebpo_sums(params, c: ModelConfig, batch: dict, masks_n, old_logp, advantages, num_rows,
              cfg: EBPOConfig):
  """(this batch's share of the clipped objective over `num_rows` rows, metric sums)."""
  new = policy_block_logprobs(params, c, batch, masks_n, cfg.block_length, **cfg.impl)
  w = 1.0 / masks_n.shape[0]  # equal weights w_n
  log_ratio = (w * (new - old_logp)).sum(axis=(0, 2))
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
  obj = jnp.minimum(ratio * advantages, clipped * advantages)
  sums = dict(loss=-obj.sum(), ratio=ratio.sum(),
              clip_fraction=(jnp.abs(ratio - clipped) > 1e-6).astype(jnp.float32).sum())
  return sums["loss"] / num_rows, sums


def ebpo_loss(params, c: ModelConfig, batch: dict, masks_n, old_logp, advantages,
              cfg: EBPOConfig):
  """Clipped EBPO objective (negated, to minimise) and metrics."""
  n = advantages.shape[0]
  loss, sums = ebpo_sums(params, c, batch, masks_n, old_logp, advantages, n, cfg)
  return loss, {k: v / n for k, v in sums.items()}


def build_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                seq_len: int, pad_id: int) -> dict:
  """Prompt + response rows padded to `seq_len`; loss on the response only."""
  b = len(prompts)
  tokens = np.full((b, seq_len), pad_id, np.int32)
  seg = np.full((b, seq_len), -1, np.int32)
  loss_mask = np.zeros((b, seq_len), bool)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    row = (list(p) + list(r))[:seq_len]
    tokens[i, :len(row)] = row
    seg[i, :len(row)] = 0
    loss_mask[i, len(p):len(row)] = True
  pos = np.where(seg >= 0, np.arange(seq_len)[None], 0).astype(np.int32)
  return dict(tokens=tokens, segment_ids=seg, positions=pos, loss_mask=loss_mask)


def rollout(generate_fn: Callable, prompts: Sequence[Sequence[int]], group_size: int,
            reward_fn: Callable[[int, list[int]], float]):
  """G responses per prompt from `generate_fn(list_of_prompts) -> GenerateResult`.

  `reward_fn(row, response_ids)` scores flat row `row` (prompt `row // group_size`).
  Returns (flat prompts, responses, rewards `[P, G]`)."""
  flat = [list(p) for p in prompts for _ in range(group_size)]
  result = generate_fn(flat)
  rewards = np.array([reward_fn(i, r) for i, r in enumerate(result.output_ids)], np.float32)
  return flat, result.output_ids, rewards.reshape(len(prompts), group_size)
