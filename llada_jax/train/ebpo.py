"""EBPO: ELBO-based block-level policy optimisation (SPEC 5.2, 7).

  log rho(y|x) ~= sum_n w_n sum_b [log p_theta(y_b | z_n, x) - log p_old(y_b | z_n, x)]
  J = E[min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)]

z_n is the 2L layout of the response noised at timestep t_n (one forward per t_n), A are
group-normalised rewards of G rollouts per prompt, drawn from our own decoder.

Where the ratio is taken (`EBPOConfig.ratio_level`):
  * "block" (default): one ratio per block b of the response, its log the per-masked-token mean
    log-ratio of the block over the N timesteps, sum_n w_n (new_nb - old_nb) / sum_n w_n m_nb
    (m_nb: masked tokens of block b at t_n); clipped per block; a row's objective is the mean
    over its blocks that had a masked token. A block's ratio stays O(1) whatever the response
    length, so one update does not clip every sample (as the summed ratio does on long answers).
  * "sequence": the same per-token normalisation over the whole response (one ratio per row).
  * "sequence_sum": the formula above as written, unnormalised (saturates on long responses).

How the masks z_n are drawn (`EBPOConfig.noise`), i.e. the variance of the log-ratio's
gradient (`experiments/results/ebpo_noise_variance.md`):
  * "complementary" (default): the N timesteps come in pairs (t, 1 - t) whose masks are
    complements over the response (the coupled sampling of DiffuCoder's coupled-GRPO), so
    every response token is scored exactly once per pair; the G rollouts of a prompt share
    their draws. Needs an even N (and equal weights within each pair). Measured on one batch
    (16 draws): a quarter of the gradient variance of "independent".
  * "group": the G rollouts of a prompt share their timesteps and the uniform draws that pick
    the masked positions (where two responses agree, the same tokens are masked in both).
    Measured on the same batch: 1.6x the variance of "independent".
  * "independent": every row its own timesteps and masked positions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.train.objectives import block_logprobs

RATIO_LEVELS = ("block", "sequence", "sequence_sum")
NOISES = ("independent", "group", "complementary")


@dataclasses.dataclass(frozen=True)
class EBPOConfig:
  group_size: int = 8  # G rollouts per prompt
  num_timesteps: int = 2  # N sampled timesteps per log-ratio
  eps_low: float = 0.2
  eps_high: float = 0.28
  ratio_level: str = "block"  # block | sequence | sequence_sum (module doc)
  noise: str = "complementary"  # complementary | group | independent (module doc)
  weights: tuple = ()  # w_n, one per timestep (() = equal weights)
  block_length: int = 32
  attention_impl: str = "xla"
  moe_impl: str = "ragged"
  remat: bool = False

  def validate(self) -> None:
    if self.ratio_level not in RATIO_LEVELS:
      raise ValueError(f"ebpo.ratio_level {self.ratio_level!r} (choose from "
                       f"{', '.join(RATIO_LEVELS)})")
    if self.noise not in NOISES:
      raise ValueError(f"ebpo.noise {self.noise!r} (choose from {', '.join(NOISES)})")
    if self.noise == "complementary" and self.num_timesteps % 2:
      raise ValueError(f"ebpo.noise='complementary' pairs the timesteps: ebpo.num_timesteps="
                       f"{self.num_timesteps} must be even (or set ebpo.noise='independent')")
    if self.weights and (len(self.weights) != self.num_timesteps
                         or any(not w >= 0 for w in self.weights) or sum(self.weights) <= 0):
      raise ValueError(f"ebpo.timestep_weights={tuple(self.weights)} must be "
                       f"{self.num_timesteps} non-negative numbers (one per timestep, "
                       "ebpo.num_timesteps) with a positive sum, or () for equal weights")
    w = tuple(self.weights)
    if self.noise == "complementary" and any(w[k] != w[k + 1] for k in range(0, len(w), 2)):
      raise ValueError(f"ebpo.noise='complementary' scores each token once per timestep pair: "
                       f"ebpo.timestep_weights={w} must be equal within each pair (2k, 2k+1)")

  def draw_masks(self, key, trainable: jax.Array):
    """(timesteps `[N, B]`, masks `[N, B, L]`) for rows in prompt groups (`noise`)."""
    return timestep_masks(key, trainable, self.num_timesteps,
                          1 if self.noise == "independent" else self.group_size,
                          self.noise == "complementary")

  def timestep_weights(self) -> jax.Array:
    """`[N]` weights w_n summing to 1."""
    w = jnp.asarray(self.weights or (1.0,) * self.num_timesteps, jnp.float32)
    return w / w.sum()

  @property
  def impl(self) -> dict:
    return dict(attention_impl=self.attention_impl, moe_impl=self.moe_impl, remat=self.remat)


def group_advantages(rewards: np.ndarray) -> np.ndarray:
  """`[P, G]` rewards -> advantages normalised within each prompt's group."""
  r = np.asarray(rewards, np.float32)
  return (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)


def timestep_masks(key, trainable: jax.Array, n: int, group_size: int = 1,
                   complementary: bool = False):
  """Timesteps `[N, B]` and masks `[N, B, L]` over the `trainable` `[B, L]` positions.

  t_n is stratified in [n/N, (n+1)/N). Rows come in groups of `group_size` consecutive rows
  (a prompt's rollouts) that share their t_n and uniform draws (1: every row its own). With
  `complementary` (N even) timesteps 2k and 2k+1 are (t, 1 - t) with t stratified over N/2
  strata, and mask 2k+1 is the complement of mask 2k on the trainable positions."""
  kt, ku = jax.random.split(key)
  b, length = trainable.shape
  if b % group_size:
    raise ValueError(f"{b} rows are not groups of {group_size}")
  draws = n // 2 if complementary else n
  t = (jnp.arange(draws)[:, None]
       + jax.random.uniform(kt, (draws, b // group_size), minval=1e-3)) / draws
  u = jax.random.uniform(ku, (draws, b // group_size, length))
  t, u = jnp.repeat(t, group_size, axis=1), jnp.repeat(u, group_size, axis=1)
  below = u < t[..., None]
  if complementary:  # interleave (t, mask) with (1 - t, its complement)
    t = jnp.stack([t, 1.0 - t], 1).reshape(n, b)
    below = jnp.stack([below, ~below], 1).reshape(n, b, length)
  return t, trainable[None] & below


def policy_block_logprobs(params, c: ModelConfig, batch: dict, masks_n: jax.Array,
                          block_length: int, **impl) -> jax.Array:
  """`[N, B, nb]` per-block log-likelihood terms, one forward per timestep (`impl`:
  attention_impl, moe_impl, remat)."""
  return jax.lax.map(lambda m: block_logprobs(params, c, batch, m, block_length, **impl),
                     masks_n)


def block_counts(masks_n: jax.Array, block_length: int) -> jax.Array:
  """`[N, B, L]` masks -> `[N, B, nb]` masked tokens per block (as `block_logprobs` sums)."""
  n, b, length = masks_n.shape
  m = masks_n.astype(jnp.float32)
  if block_length >= length:
    return m.sum(-1, keepdims=True)
  return m.reshape(n, b, length // block_length, block_length).sum(-1)


def log_ratios(new, old, counts, cfg: EBPOConfig):
  """(log-ratios `[B, K]`, which of them count `[B, K]`) from `[N, B, nb]` per-block terms:
  K = nb ratios per row at the block level, one otherwise (module doc)."""
  w = cfg.timestep_weights()[:, None, None]
  diff, tokens = (w * (new - old)).sum(0), (w * counts).sum(0)  # [B, nb]
  if cfg.ratio_level == "sequence_sum":
    return diff.sum(-1, keepdims=True), tokens.sum(-1, keepdims=True) > 0
  if cfg.ratio_level == "sequence":
    diff, tokens = diff.sum(-1, keepdims=True), tokens.sum(-1, keepdims=True)
  return diff / jnp.maximum(tokens, 1e-9), tokens > 0


def clipped_objective(log_ratio, active, advantages, cfg: EBPOConfig):
  """(the per-row PPO objective `[B]`: the mean over the row's counted ratios of
  min(rho A, clip(rho) A), metric sums over rows: the row-mean ratio and its square, the
  fraction of clipped ratios, and `live`: rows whose objective has a gradient, i.e. a non-zero
  advantage and at least one ratio the clip does not cut off)."""
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
  adv = advantages[:, None]
  obj = jnp.minimum(ratio * adv, clipped * adv)
  k = jnp.maximum(active.sum(-1), 1).astype(jnp.float32)  # counted ratios per row
  row_mean = lambda x: jnp.where(active, x, 0.0).sum(-1) / k
  is_clipped = jnp.abs(ratio - clipped) > 1e-6
  grad_flows = active & ~(is_clipped & (clipped * adv < ratio * adv))
  r = jax.lax.stop_gradient(row_mean(ratio))
  sums = dict(ratio=r.sum(), ratio_sq=(r * r).sum(),
              clip_fraction=row_mean(is_clipped.astype(jnp.float32)).sum(),
              live=(grad_flows.any(-1) & (advantages != 0)).astype(jnp.float32).sum())
  return row_mean(obj), sums


def ebpo_sums(params, c: ModelConfig, batch: dict, masks_n, old_logp, advantages, num_rows,
              cfg: EBPOConfig):
  """(this batch's share of the clipped objective over `num_rows` rows, metric sums over its
  rows: `loss` and those of `clipped_objective`)."""
  new = policy_block_logprobs(params, c, batch, masks_n, cfg.block_length, **cfg.impl)
  log_ratio, active = log_ratios(new, old_logp, block_counts(masks_n, cfg.block_length), cfg)
  obj, sums = clipped_objective(log_ratio, active, advantages, cfg)
  sums["loss"] = -obj.sum()
  return sums["loss"] / num_rows, sums


def ebpo_metrics(sums: dict, n: int) -> dict:
  """Per-row means of `ebpo_sums`'s sums (`ratio_std` from the sum of squares)."""
  m = {k: v / n for k, v in sums.items() if k != "ratio_sq"}
  m["ratio_std"] = jnp.sqrt(jnp.maximum(sums["ratio_sq"] / n - m["ratio"] ** 2, 0.0))
  return m


def ebpo_loss(params, c: ModelConfig, batch: dict, masks_n, old_logp, advantages,
              cfg: EBPOConfig):
  """Clipped EBPO objective (negated, to minimise) and metrics."""
  n = advantages.shape[0]
  loss, sums = ebpo_sums(params, c, batch, masks_n, old_logp, advantages, n, cfg)
  return loss, ebpo_metrics(sums, n)


def eos_pad(prompt: Sequence[int], answer: Sequence[int], block_length: int,
              eos_id: int) -> list[int]:
  """`answer` (ending in EOS) followed by EOS up to the end of its block, as the decoder fills a
  whole block; an answer without a final EOS (cut at its length) is returned as it is."""
  answer = list(answer)
  if not answer or answer[-1] != eos_id:
    return answer
  return answer + [eos_id] * (-(len(prompt) + len(answer)) % block_length)


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
