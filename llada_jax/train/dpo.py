"""ELBO-based DPO (SPEC 5.1): preferences scored by the single-sample block-diffusion ELBO."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig
from llada_jax.train.objectives import ObjectiveConfig, sample_mask, sequence_elbo


def dpo_loss(params, ref_params, c: ModelConfig, chosen: dict, rejected: dict, key,
             oc: ObjectiveConfig, beta: float):
  """-log sigmoid(beta [(B(w) - B_ref(w)) - (B(l) - B_ref(l))]) averaged over pairs.

  `chosen`/`rejected` are batches (see objectives) whose `loss_mask` marks the response. The
  policy and the frozen reference share each sample's ratio t and mask (one MC sample).
  """
  kw, kl = jax.random.split(key)
  terms = []
  for batch, k in ((chosen, kw), (rejected, kl)):
    trainable = batch["loss_mask"].astype(bool) & (batch["segment_ids"] >= 0)
    t, masked = sample_mask(k, trainable, oc.t_min, oc.t_max)
    pol = sequence_elbo(params, c, batch, t, masked, oc.block_length,
                        attention_impl=oc.attention_impl)
    ref = jax.lax.stop_gradient(sequence_elbo(ref_params, c, batch, t, masked,
                                              oc.block_length, attention_impl=oc.attention_impl))
    terms.append(pol - ref)
  margin = beta * (terms[0] - terms[1])
  loss = -jax.nn.log_sigmoid(margin).mean()
  return loss, dict(loss=loss, margin=margin.mean(), reward_accuracy=(margin > 0).mean(),
                    chosen_delta=terms[0].mean(), rejected_delta=terms[1].mean())
