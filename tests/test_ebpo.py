"""The EBPO objective (`llada_jax.train.ebpo`): log-ratios per block / sequence against explicit
loops, the clip applied at that level, and the metrics that say whether an update still learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.train import ebpo as E


def _terms(seed=0, n=2, b=3, nb=4, bl=4):
  rng = np.random.default_rng(seed)
  masks = rng.random((n, b, nb * bl)) < 0.5
  masks[:, 0, :bl] = False  # row 0's first block never masked: no ratio for it
  counts = masks.reshape(n, b, nb, bl).sum(-1).astype(np.float32)
  new = -rng.random((n, b, nb)).astype(np.float32) * counts
  old = new + rng.normal(0, 0.3, (n, b, nb)).astype(np.float32) * counts
  return masks, counts, new, old


@pytest.mark.parametrize("weights", [(), (0.25, 0.75)])
def test_log_ratios_match_an_explicit_loop(weights):
  masks, counts, new, old = _terms()
  n, b, nb = new.shape
  w = np.asarray(weights or (1.0,) * n, np.float64)
  w = w / w.sum()
  cfg = E.EBPOConfig(num_timesteps=n, weights=weights, block_length=4)
  np.testing.assert_array_equal(np.asarray(E.block_counts(jnp.asarray(masks), 4)), counts)
  for level in E.RATIO_LEVELS:
    got, active = E.log_ratios(jnp.asarray(new), jnp.asarray(old), jnp.asarray(counts),
                               dataclasses.replace(cfg, ratio_level=level))
    for i in range(b):
      if level == "block":
        for k in range(nb):
          tok = sum(w[t] * counts[t, i, k] for t in range(n))
          d = sum(w[t] * (new[t, i, k] - old[t, i, k]) for t in range(n))
          assert bool(active[i, k]) == (tok > 0)
          if tok > 0:
            np.testing.assert_allclose(got[i, k], d / tok, rtol=1e-5, atol=1e-6)
      else:
        d = sum(w[t] * (new[t, i, k] - old[t, i, k]) for t in range(n) for k in range(nb))
        tok = sum(w[t] * counts[t, i, k] for t in range(n) for k in range(nb))
        want = d if level == "sequence_sum" else d / tok
        np.testing.assert_allclose(got[i, 0], want, rtol=1e-5, atol=1e-5)
  assert not bool(E.log_ratios(jnp.asarray(new), jnp.asarray(old), jnp.asarray(counts),
                               cfg)[1][0, 0])


def test_the_clip_acts_per_block_and_live_counts_rows_with_a_gradient():
  cfg = E.EBPOConfig(eps_low=0.2, eps_high=0.28)
  # row 0: A > 0, one block far above 1 + eps (clipped, no gradient), one inside (gradient)
  # row 1: A > 0, every block above 1 + eps: no gradient at all
  # row 2: A < 0, a block above the clip: min picks the unclipped term -> gradient
  # row 3: A = 0: no gradient whatever the ratios
  lr = jnp.log(jnp.asarray([[2.0, 1.1], [1.5, 1.6], [2.0, 2.0], [1.0, 1.0]]))
  active = jnp.ones((4, 2), bool)
  adv = jnp.asarray([1.0, 1.0, -1.0, 0.0])
  obj, sums = E.clipped_objective(lr, active, adv, cfg)
  np.testing.assert_allclose(obj, [(1.28 + 1.1) / 2, 1.28, -2.0, 0.0], rtol=1e-5)
  assert float(sums["live"]) == 2.0  # rows 0 and 2
  np.testing.assert_allclose(sums["clip_fraction"], 0.5 + 1.0 + 1.0 + 0.0, rtol=1e-6)
  grads = jax.grad(lambda x: E.clipped_objective(x, active, adv, cfg)[0].sum())(lr)
  live_blocks = np.asarray(grads) != 0
  np.testing.assert_array_equal(live_blocks, [[False, True], [False, False], [True, True],
                                              [False, False]])


def test_the_first_update_has_ratio_one_and_inactive_blocks_do_not_count():
  cfg = E.EBPOConfig()
  lr = jnp.zeros((2, 3))
  active = jnp.asarray([[True, False, False], [True, True, True]])
  obj, sums = E.clipped_objective(lr, active, jnp.asarray([0.5, -1.0]), cfg)
  np.testing.assert_allclose(obj, [0.5, -1.0])
  m = E.ebpo_metrics(dict(sums, loss=-obj.sum()), 2)
  np.testing.assert_allclose([m["ratio"], m["ratio_std"], m["clip_fraction"], m["live"]],
                             [1.0, 0.0, 0.0, 1.0], atol=1e-6)


def test_the_block_ratio_stays_near_one_where_the_summed_ratio_saturates():
  """The issue's symptom: a small per-token change over a long response moves the summed ratio
  out of the clip range (every sample clipped after one update); per-block means do not."""
  n, b, nb, bl = 2, 4, 16, 32  # 512-token responses
  counts = jnp.full((n, b, nb), bl / 2.0)
  old = -jnp.ones((n, b, nb)) * counts
  new = old + 0.01 * counts  # +0.01 nats per masked token
  adv = jnp.asarray([1.0, -1.0, 1.0, -1.0])
  for level, clipped in (("sequence_sum", 1.0), ("block", 0.0), ("sequence", 0.0)):
    cfg = E.EBPOConfig(num_timesteps=n, ratio_level=level, block_length=bl)
    lr, active = E.log_ratios(new, old, counts, cfg)
    _, sums = E.clipped_objective(lr, active, adv, cfg)
    assert float(sums["clip_fraction"]) / b == pytest.approx(clipped), level


def test_bad_settings_are_one_line():
  with pytest.raises(ValueError, match="ebpo.ratio_level 'token'"):
    E.EBPOConfig(ratio_level="token").validate()
  with pytest.raises(ValueError, match="must be 2 non-negative numbers"):
    E.EBPOConfig(num_timesteps=2, weights=(1.0,)).validate()
  E.EBPOConfig(num_timesteps=2, weights=(0.0, 1.0), noise="independent").validate()


def test_eos_pad_fills_the_answers_block():
  assert E.eos_pad([1, 2, 3], [7, 9], 4, 9) == [7, 9, 9, 9, 9]  # 3 + 2 tokens -> two blocks
  assert E.eos_pad([1, 2], [7, 9], 4, 9) == [7, 9]  # already ends on a block boundary
  assert E.eos_pad([1, 2, 3], [7, 8], 4, 9) == [7, 8]  # cut at its length: no EOS, no padding


def _trainable(b=6, length=40, start=8):
  t = np.zeros((b, length), bool)
  t[:, start:] = True
  t[1, 30:] = False  # one rollout of the group is shorter
  return jnp.asarray(t)


def test_independent_masks_differ_between_rows_and_stay_on_trainable_positions():
  trainable = _trainable()
  t, m = E.EBPOConfig(group_size=3, num_timesteps=4, noise="independent").draw_masks(
      jax.random.PRNGKey(0), trainable)
  assert t.shape == (4, 6) and m.shape == (4, 6, 40)
  assert not bool((m & ~trainable[None]).any())
  t_np = np.asarray(t)
  for n in range(4):  # stratified: t_n in [n/N, (n+1)/N)
    assert ((t_np[n] >= n / 4) & (t_np[n] < (n + 1) / 4)).all()
  assert len({np.asarray(m[1, i]).tobytes() for i in range(6)}) == 6


def test_group_noise_masks_the_same_positions_in_every_rollout_of_a_prompt():
  trainable = _trainable()
  cfg = E.EBPOConfig(group_size=3, num_timesteps=2, noise="group")
  t, m = cfg.draw_masks(jax.random.PRNGKey(1), trainable)
  t, m = np.asarray(t), np.asarray(m)
  both = np.asarray(trainable[0] & trainable[1])
  for g in (0, 3):  # groups of 3 consecutive rows
    np.testing.assert_array_equal(t[:, g], t[:, g + 1])
    np.testing.assert_array_equal(t[:, g], t[:, g + 2])
    np.testing.assert_array_equal(m[:, g + 2], m[:, g])
    np.testing.assert_array_equal(m[:, g + 1] & both, m[:, g] & both)
  assert (m[:, 0] != m[:, 3]).any()  # two prompts: their own draws
  assert not (m[:, 1, 30:]).any()  # the short rollout's untrainable tail is never masked


def test_complementary_masks_score_every_response_token_once_per_pair():
  trainable = _trainable()
  cfg = E.EBPOConfig(group_size=3, num_timesteps=4, noise="complementary")
  t, m = cfg.draw_masks(jax.random.PRNGKey(2), trainable)
  t, m = np.asarray(t), np.asarray(m)
  for k in (0, 2):
    np.testing.assert_allclose(t[k] + t[k + 1], 1.0, rtol=1e-6)
    assert not (m[k] & m[k + 1]).any()
    np.testing.assert_array_equal(m[k] | m[k + 1], np.asarray(trainable))
  np.testing.assert_array_equal(m[:, 0], m[:, 2])  # shared within the group
  with pytest.raises(ValueError, match="num_timesteps=3 must be even"):
    E.EBPOConfig(num_timesteps=3, noise="complementary").validate()
  with pytest.raises(ValueError, match="ebpo.noise 'fixed'"):
    E.EBPOConfig(noise="fixed").validate()
  with pytest.raises(ValueError, match="equal within each pair"):
    E.EBPOConfig(num_timesteps=2, weights=(0.25, 0.75), noise="complementary").validate()
  E.EBPOConfig(num_timesteps=4, weights=(1.0, 1.0, 3.0, 3.0), noise="complementary").validate()
  for k in (0, 2):  # one draw per pair, stratified over N/2 strata: t_0 in [0, .5), t_2 in [.5, 1)
    assert ((t[k] >= k / 4) & (t[k] < (k + 2) / 4)).all()
  assert (m[:, 0] != m[:, 3]).any()  # the next prompt's group has its own draws
