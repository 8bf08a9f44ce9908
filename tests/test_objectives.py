"""Training objectives against slow, obviously-correct references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import masks
from llada_jax.model.transformer import forward_core
from llada_jax.train import objectives as obj

L, BL = 16, 4

# Jitted once per (config, objective): op-by-op execution of the model is slow on CPU.
_bdlm_loss = jax.jit(obj.bdlm_loss, static_argnums=(1, 4))


def _batch(c, rng):
  tokens = rng.integers(0, c.vocab_size - 2, (2, L)).astype(np.int32)
  # row 0: one document; row 1: two packed documents then padding
  seg = np.array([[0] * L, [0] * 6 + [1] * 7 + [-1] * 3], np.int32)
  pos = np.array([list(range(L)), list(range(6)) + list(range(7)) + [0] * 3], np.int32)
  loss_mask = seg >= 0
  loss_mask[0, :3] = False  # a "prompt" that is never masked
  return dict(tokens=tokens, segment_ids=seg, positions=pos, loss_mask=loss_mask)


def _reference_nll(params, c, batch, masked, block_length):
  """-log p(x0) per position, one model call per (row, document, block): the clean prefix of
  earlier blocks of the same document followed by the noisy block, block-causal ids."""
  x0, seg, pos = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions"))
  xt = np.where(masked, c.mask_token_id, x0)
  nll = np.zeros(x0.shape, np.float64)
  for r in range(x0.shape[0]):
    for d in sorted(set(seg[r]) - {-1}):
      for k in range(L // block_length):
        lo, hi = k * block_length, (k + 1) * block_length
        prefix = [p for p in range(lo) if seg[r, p] == d]
        block = [p for p in range(lo, hi) if seg[r, p] == d]
        if not block:
          continue
        idx = prefix + block
        toks = np.concatenate([x0[r, prefix], xt[r, block]]).astype(np.int32)[None]
        ids = np.array(idx, np.int32)[None] // block_length
        layout = masks.Layout(jnp.asarray(ids), jnp.zeros(ids.shape, bool),
                              jnp.zeros(ids.shape, jnp.int32))
        logits = forward_core(params, c, jnp.asarray(toks), jnp.asarray(pos[r, idx][None]),
                              layout).logits[0, len(prefix):]
        logp = jax.nn.log_softmax(logits, -1)
        for j, p in enumerate(block):
          nll[r, p] = -float(logp[j, x0[r, p]])
  return nll


@pytest.mark.parametrize("weighting", ["token_mean", "inv_t"])
def test_bdlm_loss_matches_reference(tiny, weighting):
  c, params = tiny.config, tiny.params
  batch = _batch(c, np.random.default_rng(0))
  oc = obj.ObjectiveConfig(block_length=BL, t_min=0.3, t_max=0.9, weighting=weighting)
  key = jax.random.PRNGKey(3)
  loss, metrics = _bdlm_loss(params, c, batch, key, oc)
  trainable = batch["loss_mask"] & (batch["segment_ids"] >= 0)
  t, masked = obj.sample_mask(jax.random.split(key, 5)[0], jnp.asarray(trainable), 0.3, 0.9)
  t, masked = np.asarray(t), np.asarray(masked)
  assert masked.sum() > 3 and not masked[~trainable].any()
  nll = _reference_nll(params, c, batch, masked, BL)
  if weighting == "token_mean":
    ref = (nll * masked).sum() / masked.sum()
  else:
    ref = ((nll * masked).sum(-1) / t).sum() / trainable.sum()
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(metrics["masked_tokens"]) == masked.sum()


def test_mdlm_is_the_whole_sequence_case(tiny):
  """block_length >= L: x_t alone, bidirectional inside each document."""
  c, params = tiny.config, tiny.params
  batch = _batch(c, np.random.default_rng(1))
  masked = np.zeros((2, L), bool)
  masked[:, 4:9] = True
  got = np.asarray(obj.block_logprobs(params, c, batch, jnp.asarray(masked), L))
  x0 = batch["tokens"]
  xt = np.where(masked, c.mask_token_id, x0)
  ref = []
  for r, docs in ((0, [range(16)]), (1, [range(6), range(6, 13)])):
    total = 0.0
    for doc in docs:
      doc = list(doc)
      lay = masks.bidirectional(1, len(doc))
      lg = forward_core(params, c, jnp.asarray(xt[r, doc][None]),
                        jnp.asarray(batch["positions"][r, doc][None]), lay).logits[0]
      lp = np.asarray(jax.nn.log_softmax(lg, -1))
      total += sum(lp[j, x0[r, p]] for j, p in enumerate(doc) if masked[r, p])
    ref.append(total)
  np.testing.assert_allclose(got[:, 0], ref, rtol=1e-5)


def test_block_logprobs_sum_to_elbo(tiny):
  c, params = tiny.config, tiny.params
  batch = _batch(c, np.random.default_rng(2))
  masked = jnp.asarray(np.random.default_rng(3).random((2, L)) < 0.5) & (
      batch["segment_ids"] >= 0)
  t = jnp.array([0.5, 0.25])
  per_block = obj.block_logprobs(params, c, batch, masked, BL)
  assert per_block.shape == (2, L // BL)
  elbo = obj.sequence_elbo(params, c, batch, t, masked, BL)
  np.testing.assert_allclose(np.asarray(elbo), np.asarray(per_block.sum(-1) / t), rtol=1e-5)


def test_complementary_masks_cover_every_trainable_token(tiny):
  c = tiny.config
  batch = _batch(c, np.random.default_rng(4))
  oc = obj.ObjectiveConfig(block_length=BL, complementary=True)
  _, m = _bdlm_loss(tiny.params, c, batch, jax.random.PRNGKey(0), oc)
  trainable = (batch["loss_mask"] & (batch["segment_ids"] >= 0)).sum()
  assert float(m["masked_tokens"]) == trainable  # mask + inverted mask = every token once


def test_editing_stream_counts_and_losses(tiny):
  c = tiny.config
  batch = _batch(c, np.random.default_rng(5))
  oc = obj.ObjectiveConfig(block_length=BL, edit_rate=0.5, mtf_rate=0.5, cap_weight=1.0,
                           mask_embed_noise=0.1)
  loss, m = _bdlm_loss(tiny.params, c, batch, jax.random.PRNGKey(1), oc)
  assert float(m["corrupted_tokens"]) > 0 and float(m["t2t_loss"]) > 0
  assert float(m["cap_loss"]) >= 0 and float(m["keep_loss"]) > 0
  np.testing.assert_allclose(float(loss), float(m["m2t_loss"] + m["t2t_loss"] + m["keep_loss"]
                                                + m["cap_loss"]), rtol=1e-6)
  grads = jax.jit(jax.grad(lambda p: obj.bdlm_loss(p, c, batch, jax.random.PRNGKey(1), oc)[0]))(
      tiny.params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_keep_loss_is_the_nll_of_the_clean_visible_tokens(tiny):
  """keep = mean -log p(x_0) over trainable tokens that are neither masked nor corrupted,
  recomputed here from the logits of the same noisy input; off without the editing stream."""
  c = tiny.config
  batch = _batch(c, np.random.default_rng(6))
  key = jax.random.PRNGKey(2)
  oc = obj.ObjectiveConfig(block_length=BL, edit_rate=0.3, keep_weight=0.5)
  loss, m = _bdlm_loss(tiny.params, c, batch, key, oc)
  # Rebuild the noisy input exactly as bdlm_loss draws it.
  k_mask, k_edit, k_tok, _, _ = jax.random.split(key, 5)
  x0 = jnp.asarray(batch["tokens"], jnp.int32)
  trainable = jnp.asarray(batch["loss_mask"], bool) & (jnp.asarray(batch["segment_ids"]) >= 0)
  _, masked = obj.sample_mask(k_mask, trainable, oc.t_min, oc.t_max)
  corrupted = trainable & ~masked & (jax.random.uniform(k_edit, x0.shape) < oc.edit_rate)
  xt = jnp.where(masked, c.mask_token_id, x0)
  xt = jnp.where(corrupted, obj._random_tokens(k_tok, x0.shape, c.vocab_size, c.mask_token_id),
                 xt)
  logits = jax.jit(obj.noisy_logits, static_argnums=(1, 6))(
      tiny.params, c, xt, x0, batch["segment_ids"], batch["positions"], BL)
  nll = np.asarray(obj.token_nll(logits, x0)[0])
  clean = np.asarray(trainable & ~masked & ~corrupted)
  assert clean.sum() > 0 and np.asarray(corrupted).sum() > 0
  np.testing.assert_allclose(float(m["keep_loss"]), nll[clean].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["t2t_loss"]), nll[np.asarray(corrupted)].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(m["m2t_loss"] + m["t2t_loss"]
                                                + 0.5 * m["keep_loss"]), rtol=1e-6)
  _, m0 = _bdlm_loss(tiny.params, c, batch, key, obj.ObjectiveConfig(block_length=BL))
  assert float(m0["keep_loss"]) == 0.0 and float(m0["t2t_loss"]) == 0.0


@pytest.mark.parametrize("kw, msg", [
    (dict(block_length=5), "does not divide"),
    (dict(keep_weight=-1.0), "keep_weight"),
    (dict(t_min=0.0), "t_min"),
    (dict(weighting="sqrt"), "weighting"),
    (dict(edit_rate=2.0), "edit_rate"),
])
def test_objective_config_validation(kw, msg):
  with pytest.raises(ValueError, match=msg):
    obj.ObjectiveConfig(**kw).validate(seq_len=L)
