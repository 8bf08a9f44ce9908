"""ELBO-based DPO (SPEC 5.1): preferences scored by the single-sample block-diffusion ELBO."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.train.objectives import ObjectiveConfig, sample_mask, sequence_elbo


def dpo_noise(key, chosen: dict, rejected: dict, oc: ObjectiveConfig) -> dict:
  """The per-row draws (ratio t `[B]`, masked positions `[B, L]`) of the chosen and the rejected
  batch; the policy and the frozen reference share them (one MC sample)."""
  kw, kl = jax.random.split(key)
  out = {}
  for name, batch, k in (("chosen", chosen, kw), ("rejected", rejected, kl)):
    trainable = batch["loss_mask"].astype(bool) & (batch["segment_ids"] >= 0)
    t, masked = sample_mask(k, trainable, oc.t_min, oc.t_max)
    out[name] = dict(t=t, masked=masked)
  return out


def record_noise(key, chosen: dict, rejected: dict, oc: ObjectiveConfig) -> dict:
  """`dpo_noise` drawn per record instead of per step: row j's ratio t and mask come from
  `fold_in(key, record id)` (`chosen["record"]` `[B]` int32), so a pair gets the same draw every
  time it is seen: what a reference ELBO computed once per pair (`dpo.reference="precomputed"`)
  must share with the policy."""
  ids = chosen["record"]

  def one(k, trainable):
    t, masked = sample_mask(k, trainable[None], oc.t_min, oc.t_max)
    return t[0], masked[0]

  out = {}
  for salt, (name, batch) in enumerate((("chosen", chosen), ("rejected", rejected))):
    keys = jax.vmap(lambda i, s=salt: jax.random.fold_in(jax.random.fold_in(key, s), i))(ids)
    trainable = batch["loss_mask"].astype(bool) & (batch["segment_ids"] >= 0)
    t, masked = jax.vmap(one)(keys, trainable)
    out[name] = dict(t=t, masked=masked)
  return out


def reference_elbos(ref_params, c: ModelConfig, chosen: dict, rejected: dict, noise: dict,
                    oc: ObjectiveConfig) -> dict:
  """The frozen reference's single-sample ELBOs `{"chosen": [B], "rejected": [B]}` float32."""
  return {name: jax.lax.stop_gradient(sequence_elbo(
      ref_params, c, batch, noise[name]["t"], noise[name]["masked"], oc.block_length, **oc.impl))
      for name, batch in (("chosen", chosen), ("rejected", rejected))}


def dpo_sums(params, ref_params, c: ModelConfig, chosen: dict, rejected: dict, noise: dict,
             num_pairs, oc: ObjectiveConfig, beta: float, ref_elbos: dict | None = None):
  """(this batch's share of the loss over `num_pairs` pairs, metric sums). `ref_elbos`: the
  reference's ELBOs of these rows (`reference_elbos`, precomputed) instead of `ref_params`."""
  if ref_elbos is None:
    ref_elbos = reference_elbos(ref_params, c, chosen, rejected, noise, oc)
  terms = []
  for name, batch in (("chosen", chosen), ("rejected", rejected)):
    n = noise[name]
    pol = sequence_elbo(params, c, batch, n["t"], n["masked"], oc.block_length, **oc.impl)
    terms.append(pol - ref_elbos[name])
  margin = beta * (terms[0] - terms[1])
  loss = -jax.nn.log_sigmoid(margin).sum()
  wins = (margin > 0).astype(jnp.float32).sum()
  sums = dict(loss=loss, margin=margin.sum(), reward_accuracy=wins,
              chosen_delta=terms[0].sum(), rejected_delta=terms[1].sum())
  return loss / num_pairs, sums


def dpo_metrics(sums: dict, num_pairs) -> dict:
  return {k: v / num_pairs for k, v in sums.items()}


def dpo_loss(params, ref_params, c: ModelConfig, chosen: dict, rejected: dict, key,
             oc: ObjectiveConfig, beta: float):
  """-log sigmoid(beta [(B(w) - B_ref(w)) - (B(l) - B_ref(l))]) averaged over pairs.

  `chosen`/`rejected` are batches (see objectives) whose `loss_mask` marks the response. The
  policy and the frozen reference share each sample's ratio t and mask (one MC sample).
  """
  noise = dpo_noise(key, chosen, rejected, oc)
  n = chosen["tokens"].shape[0]
  loss, sums = dpo_sums(params, ref_params, c, chosen, rejected, noise, n, oc, beta)
  return loss, dpo_metrics(sums, n)
