"""Block-diffusion training objectives as pure functions of (params, batch, PRNG key).

A batch is a dict of `[B, L]` arrays:
  tokens       int32  clean tokens x_0
  segment_ids  int32  document id per token, -1 on padding
  positions    int32  position within the document
  loss_mask    bool   tokens that may be masked and trained (SFT: the response only)

Layouts (SPEC 3.2): `block_length < L` runs the 2L input `[x_t ; x_0]` with the block-diffusion
mask (logits of the noisy half only, labels = x_0 at the same position); `block_length >= L` is
MDLM (one block: x_t alone, bidirectional within each document); `block_length = 1` is the AR end.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada_jax import masks
from llada_jax.config import ModelConfig
from llada_jax.model.transformer import forward_core

WEIGHTINGS = ("token_mean", "inv_t")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Knobs of the BDLM / editing objective (hashable: a static argument of the train step)."""

  block_length: int = 32
  t_min: float = 0.3  # mask ratio t ~ U[t_min, t_max] per sequence
  t_max: float = 0.8
  weighting: str = "token_mean"  # "token_mean" (dFactory) or "inv_t" (paper ELBO, 1/t)
  complementary: bool = False  # add each sample again with the inverted mask
  edit_rate: float = 0.0  # T2T stream: fraction of unmasked trainable tokens set to random ids
  mtf_rate: float = 0.0  # T2T stream: fraction of masked tokens replaced by the model's draft
  edit_weight: float = 1.0  # weight of the T2T loss
  # With the editing stream on: weight of the "keep" loss on the clean visible response tokens
  # (predict the token that is already there). Without it the T2T stream only ever sees wrong
  # visible tokens, so the model learns that a visible token is never right and editing
  # decoders rewrite (and oscillate on) correct drafts.
  keep_weight: float = 1.0
  cap_weight: float = 0.0  # CAP: entropy on masked positions already predicted right
  mask_embed_noise: float = 0.0  # std of Gaussian noise added to masked-token embeddings
  attention_impl: str = "xla"
  remat: bool = False  # rematerialise each layer in the backward pass
  moe_impl: str = "ragged"  # "ep" / "ep_ragged": expert parallelism under a mesh

  @property
  def impl(self) -> dict:
    """The model-implementation keywords (`noisy_logits`, `sequence_elbo`, `block_logprobs`)."""
    return dict(attention_impl=self.attention_impl, moe_impl=self.moe_impl, remat=self.remat)

  def validate(self, seq_len: int | None = None) -> None:
    def bad(msg):
      raise ValueError(f"invalid objective config: {msg}")
    if self.block_length < 1:
      bad(f"block_length must be >= 1, got {self.block_length}")
    if seq_len is not None and self.block_length < seq_len and seq_len % self.block_length:
      bad(f"block_length {self.block_length} does not divide the sequence length {seq_len}")
    if not 0.0 < self.t_min <= self.t_max <= 1.0:
      bad(f"need 0 < t_min <= t_max <= 1, got [{self.t_min}, {self.t_max}]")
    if self.weighting not in WEIGHTINGS:
      bad(f"weighting {self.weighting!r} (choose from {', '.join(WEIGHTINGS)})")
    for name in ("edit_rate", "mtf_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        bad(f"{name} must be in [0, 1]")
    for name in ("edit_weight", "keep_weight", "cap_weight", "mask_embed_noise"):
      if getattr(self, name) < 0:
        bad(f"{name} must be >= 0")


def expert_load(router_idx: jax.Array | None, valid: jax.Array, num_experts: int) -> jax.Array:
  """Tokens routed to each expert per MoE layer, `[Lm, E]` float32, counting the `valid`
  (`[B, T]` bool) tokens of `router_idx` `[Lm, B, T, K]` (`[0, E]` without MoE layers)."""
  if router_idx is None:
    return jnp.zeros((0, num_experts), jnp.float32)
  lm = router_idx.shape[0]
  weight = jnp.broadcast_to(valid[..., None], router_idx.shape[1:]).astype(jnp.float32)
  count = lambda idx: jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(
      weight.reshape(-1))
  return jax.vmap(count)(router_idx.reshape(lm, -1, router_idx.shape[-1]))


def noisy_logits(params, c: ModelConfig, xt, x0, segment_ids, positions, block_length: int,
                 *, embed_delta=None, attention_impl: str = "xla",
                 remat: bool = False, moe_impl: str = "ragged", with_load: bool = False):
  """Logits `[B, L, V]` float32 of the noisy tokens `xt` given the clean context `x0`; with
  `with_load`, (logits, `expert_load` `[Lm, E]` of every real token the forward routed)."""
  b, length = xt.shape
  valid = segment_ids >= 0
  if block_length >= length:  # MDLM: one block, no clean copy needed
    layout = masks.Layout(jnp.zeros((b, length), jnp.int32), jnp.zeros((b, length), bool),
                          segment_ids.astype(jnp.int32))
    out = forward_core(params, c, xt, positions, layout, embed_delta=embed_delta,
                       attention_impl=attention_impl, remat=remat, moe_impl=moe_impl)
  else:
    tokens = jnp.concatenate([xt, x0], axis=1)
    pos = jnp.concatenate([positions, positions], axis=1)
    layout = masks.training(length, block_length, segment_ids)
    if embed_delta is not None:
      embed_delta = jnp.concatenate([embed_delta, jnp.zeros_like(embed_delta)], axis=1)
    out = forward_core(params, c, tokens, pos, layout, logits_slice=(0, length),
                       embed_delta=embed_delta, attention_impl=attention_impl,
                       remat=remat, moe_impl=moe_impl)
    valid = jnp.concatenate([valid, valid], axis=1)
  if not with_load:
    return out.logits
  return out.logits, expert_load(jax.lax.stop_gradient(out.router_idx), valid, c.num_experts)


def sample_mask(key, loss_mask, t_min, t_max):
  """Per-sequence ratio t `[B]` and the masked positions `[B, L]` (each w.p. t)."""
  kt, ku = jax.random.split(key)
  b = loss_mask.shape[0]
  t = jax.random.uniform(kt, (b,), minval=t_min, maxval=t_max)
  masked = loss_mask & (jax.random.uniform(ku, loss_mask.shape) < t[:, None])
  return t, masked


def token_nll(logits, labels):
  """-log p(label) `[B, L]` and the log-probs `[B, L, V]`."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0], logp


def _random_tokens(key, shape, vocab, mask_id):
  r = jax.random.randint(key, shape, 0, vocab - 1)
  return jnp.where(r >= mask_id, r + 1, r).astype(jnp.int32)  # never the mask id


def _rows_first(x, copies):
  """`[copies * B, ...]` (copies stacked) -> `[B, copies, ...]` (per-row first)."""
  return jnp.moveaxis(x.reshape((copies, -1) + x.shape[1:]), 0, 1)


def _rows_flat(x):
  """`[B, copies, ...]` -> `[copies * B, ...]` (the inverse of `_rows_first`)."""
  x = jnp.moveaxis(x, 1, 0)
  return x.reshape((-1,) + x.shape[2:])


def bdlm_noise(key: jax.Array, batch: dict, c: ModelConfig, oc: ObjectiveConfig) -> dict:
  """Every random draw of one BDLM step; no params involved (so a batch split into
  micro-batches sees exactly the draws of the whole batch). Per-row arrays `[B, copies, ...]`
  (copies = 2 with complementary masks, else 1):

    t [B, c] mask ratio, trainable / masked / corrupted [B, c, L] (final: MTF-picked positions
    count as corrupted), pick [B, c, L] positions that take the model's draft, xt [B, c, L]
    noisy tokens before the drafts, embed_noise [B, c, L, D] (with mask_embed_noise).
  """
  x0 = batch["tokens"].astype(jnp.int32)
  seg = batch["segment_ids"].astype(jnp.int32)
  trainable = batch["loss_mask"].astype(bool) & (seg >= 0)
  k_mask, k_edit, k_tok, k_mtf, k_noise = jax.random.split(key, 5)
  t, masked = sample_mask(k_mask, trainable, oc.t_min, oc.t_max)
  copies = 1
  if oc.complementary:
    copies = 2
    x0, trainable = (jnp.concatenate([a, a]) for a in (x0, trainable))
    masked = jnp.concatenate([masked, trainable[: t.shape[0]] & ~masked])
    t = jnp.concatenate([t, 1.0 - t])
  xt = jnp.where(masked, c.mask_token_id, x0)
  corrupted = jnp.zeros_like(masked)
  if oc.edit_rate > 0:
    corrupted = trainable & ~masked & (jax.random.uniform(k_edit, x0.shape) < oc.edit_rate)
    xt = jnp.where(corrupted, _random_tokens(k_tok, x0.shape, c.vocab_size, c.mask_token_id), xt)
  pick = jnp.zeros_like(masked)
  if oc.mtf_rate > 0:
    k1, _ = jax.random.split(k_mtf)
    pick = masked & (jax.random.uniform(k1, x0.shape) < oc.mtf_rate)
    masked, corrupted = masked & ~pick, corrupted | pick
  out = dict(t=t, trainable=trainable, masked=masked, corrupted=corrupted, pick=pick, xt=xt)
  if oc.mask_embed_noise > 0:
    out["embed_noise"] = jax.random.normal(k_noise, x0.shape + (c.hidden_size,)) * \
        oc.mask_embed_noise
  return {k: _rows_first(v, copies) for k, v in out.items()}


def bdlm_denominators(noise: dict, oc: ObjectiveConfig) -> dict:
  """The normalisers of the BDLM terms over the whole batch (they depend on the draws only)."""
  f = lambda x: x.astype(jnp.float32).sum()
  editing = oc.edit_rate > 0 or oc.mtf_rate > 0
  kept = noise["trainable"] & ~noise["masked"] & ~noise["corrupted"]
  return dict(masked=f(noise["masked"]), corrupted=f(noise["corrupted"]),
              kept=f(kept) if editing else jnp.zeros(()), trainable=f(noise["trainable"]),
              t_sum=noise["t"].sum(), rows=jnp.asarray(noise["t"].size, jnp.float32))


def _bdlm_logits(params, c, batch, noise, oc, with_load=False):
  """(logits [cB, L, V], x0, noise rows) of a (micro-)batch, plus the expert load `[Lm, E]`
  of the forward with `with_load`."""
  copies = noise["t"].shape[1]
  rep = lambda k: jnp.concatenate([batch[k].astype(jnp.int32)] * copies)
  x0, seg, pos = rep("tokens"), rep("segment_ids"), rep("positions")
  n = {k: _rows_flat(v) for k, v in noise.items()}
  xt = n["xt"]
  impl = dict(attention_impl=oc.attention_impl, moe_impl=oc.moe_impl)
  if oc.mtf_rate > 0:
    draft_logits = jax.lax.stop_gradient(noisy_logits(
        params, c, xt, x0, seg, pos, oc.block_length, **impl))
    xt = jnp.where(n["pick"], jnp.argmax(draft_logits, axis=-1).astype(jnp.int32), xt)
  delta = None
  if "embed_noise" in n:
    delta = jnp.where((xt == c.mask_token_id)[..., None], n["embed_noise"], 0.0)
  out = noisy_logits(params, c, xt, x0, seg, pos, oc.block_length, embed_delta=delta,
                     remat=oc.remat, with_load=with_load, **impl)
  if with_load:
    return out[0], x0, n, out[1]
  return out, x0, n


def bdlm_cap_count(params, c: ModelConfig, batch: dict, noise: dict, oc: ObjectiveConfig):
  """How many masked positions the model already predicts right (CAP's normaliser)."""
  logits, x0, n = _bdlm_logits(params, c, batch, noise, oc)
  return ((jnp.argmax(logits, -1) == x0) & n["masked"]).astype(jnp.float32).sum()


def bdlm_sums(params, c: ModelConfig, batch: dict, noise: dict, denoms: dict,
              oc: ObjectiveConfig):
  """(this batch's share of the loss, its metric sums), normalised by the whole batch's
  `denoms` (`bdlm_denominators`, plus `cap` from `bdlm_cap_count` when the batch is one of
  several micro-batches): the shares of the micro-batches add up to the whole batch's loss."""
  logits, x0, n, load = _bdlm_logits(params, c, batch, noise, oc, with_load=True)
  nll, logp = token_nll(logits, x0)
  mf, cf = n["masked"].astype(jnp.float32), n["corrupted"].astype(jnp.float32)
  if oc.weighting == "token_mean":
    m2t = (nll * mf).sum()
  else:  # paper ELBO: sum over masked tokens of 1/t * nll, per trainable token
    m2t = ((nll * mf).sum(-1) / n["t"]).sum()
  t2t = (nll * cf).sum()
  keep = jnp.zeros(())
  editing = oc.edit_rate > 0 or oc.mtf_rate > 0
  if editing and oc.keep_weight > 0:
    kf = (n["trainable"] & ~n["masked"] & ~n["corrupted"]).astype(jnp.float32)
    keep = (nll * kf).sum()
  argmax = jnp.argmax(logits, -1)
  correct = (argmax == x0) & n["masked"]
  cap = jnp.zeros(())
  if oc.cap_weight > 0:
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    cap = (entropy * correct.astype(jnp.float32)).sum()
  sums = dict(m2t=m2t, t2t=t2t, keep=keep, cap=cap, correct=correct.astype(jnp.float32).sum(),
              edit_correct=((argmax == x0) & n["corrupted"]).astype(jnp.float32).sum(),
              expert_load=load)
  norm = _bdlm_norms(denoms, sums, oc)
  editing_terms = t2t / norm["t2t"] + oc.keep_weight * keep / norm["keep"]
  loss = m2t / norm["m2t"] + oc.edit_weight * editing_terms + oc.cap_weight * cap / norm["cap"]
  return loss, sums


def _bdlm_norms(denoms: dict, sums: dict, oc: ObjectiveConfig) -> dict:
  one = lambda x: jnp.maximum(x, 1.0)
  m2t = denoms["masked"] if oc.weighting == "token_mean" else denoms["trainable"]
  cap = denoms["cap"] if "cap" in denoms else sums["correct"]
  return dict(m2t=one(m2t), t2t=one(denoms["corrupted"]), keep=one(denoms["kept"]),
              cap=one(cap))


def bdlm_metrics(sums: dict, denoms: dict, oc: ObjectiveConfig) -> dict:
  """The logged metrics from the (summed) `bdlm_sums` of a whole batch."""
  norm = _bdlm_norms(denoms, sums, oc)
  m2t, t2t = sums["m2t"] / norm["m2t"], sums["t2t"] / norm["t2t"]
  keep, cap = sums["keep"] / norm["keep"], sums["cap"] / norm["cap"]
  loss = m2t + oc.edit_weight * (t2t + oc.keep_weight * keep) + oc.cap_weight * cap
  out = dict(loss=loss, m2t_loss=m2t, t2t_loss=t2t, keep_loss=keep, cap_loss=cap,
             accuracy=sums["correct"] / jnp.maximum(denoms["masked"], 1.0),
             edit_accuracy=sums["edit_correct"] / jnp.maximum(denoms["corrupted"], 1.0),
             mask_ratio=denoms["t_sum"] / denoms["rows"], masked_tokens=denoms["masked"],
             corrupted_tokens=denoms["corrupted"])
  if "expert_load" in sums:
    out.update(load_metrics(sums["expert_load"]))
  return out


def load_metrics(load: jax.Array) -> dict:
  """MoE load statistics from `expert_load` `[Lm, E]`: the counts themselves
  (`expert_tokens`, per layer and expert) and, per layer, the busiest and idlest expert's load
  over the mean (`expert_load_max` / `expert_load_min` `[Lm]`; 1 = perfectly balanced)."""
  if load.shape[0] == 0:
    return {}
  mean = jnp.maximum(load.mean(-1), 1e-9)
  return dict(expert_tokens=load, expert_load_max=load.max(-1) / mean,
              expert_load_min=load.min(-1) / mean)


def bdlm_loss(params, c: ModelConfig, batch: dict, key: jax.Array, oc: ObjectiveConfig):
  """The LLaDA2.1 mixed objective: M2T (masked) + T2T (corrupted) + optional CAP.

  loss = m2t + edit_weight * (t2t + keep_weight * keep) + cap_weight * cap, where t2t is the mean
  NLL of x_0 on corrupted positions and keep the mean NLL on the other (clean) visible trainable
  positions; both are zero unless the editing stream (edit_rate or mtf_rate > 0) is on.

  Returns (loss, metrics) with metrics: loss, m2t_loss, t2t_loss, keep_loss, cap_loss, accuracy
  (argmax on masked positions), edit_accuracy (argmax on corrupted positions), mask_ratio
  (mean t), masked_tokens, corrupted_tokens. The pieces (`bdlm_noise`, `bdlm_denominators`,
  `bdlm_sums`, `bdlm_metrics`) let the trainer split a batch into micro-batches exactly.
  """
  noise = bdlm_noise(key, batch, c, oc)
  denoms = bdlm_denominators(noise, oc)
  loss, sums = bdlm_sums(params, c, batch, noise, denoms, oc)
  return loss, bdlm_metrics(sums, denoms, oc)


def sequence_elbo(params, c: ModelConfig, batch: dict, t: jax.Array, masked: jax.Array,
                  block_length: int, *, attention_impl: str = "xla", moe_impl: str = "ragged",
                  remat: bool = False) -> jax.Array:
  """Single-sample block-diffusion ELBO per sequence `[B]` (SPEC 5.1 eq. 7):
  sum over masked positions of (1/t) log p(x_0 | x_t, clean earlier blocks)."""
  x0 = batch["tokens"].astype(jnp.int32)
  xt = jnp.where(masked, c.mask_token_id, x0)
  logits = noisy_logits(params, c, xt, x0, batch["segment_ids"], batch["positions"],
                        block_length, attention_impl=attention_impl, moe_impl=moe_impl,
                        remat=remat)
  nll, _ = token_nll(logits, x0)
  return -(nll * masked).sum(-1) / t


def block_logprobs(params, c: ModelConfig, batch: dict, masked: jax.Array, block_length: int,
                   *, attention_impl: str = "xla", moe_impl: str = "ragged",
                   remat: bool = False) -> jax.Array:
  """Per-block sums of log p(x_0) over masked positions `[B, L // block_length]` (EBPO)."""
  x0 = batch["tokens"].astype(jnp.int32)
  xt = jnp.where(masked, c.mask_token_id, x0)
  logits = noisy_logits(params, c, xt, x0, batch["segment_ids"], batch["positions"],
                        block_length, attention_impl=attention_impl, moe_impl=moe_impl,
                        remat=remat)
  nll, _ = token_nll(logits, x0)
  b, length = x0.shape
  per_tok = -(nll * masked)
  if block_length >= length:
    return per_tok.sum(-1, keepdims=True)
  return per_tok.reshape(b, length // block_length, block_length).sum(-1)
