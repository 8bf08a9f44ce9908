"""The mask rules of SPEC 3, checked position by position against their definitions."""

import numpy as np
import pytest

from llada_jax import masks


def _dense(layout_q, layout_k=None):
  return np.asarray(masks.visible(layout_q, layout_k or layout_q))[0]


@pytest.mark.parametrize("block", [1, 3, 4, 16])
def test_block_causal(block):
  t = 16
  m = _dense(masks.from_block_length(1, t, block))
  for i in range(t):
    for j in range(t):
      assert m[i, j] == (j // block <= i // block)


def test_bidirectional():
  assert _dense(masks.from_block_length(1, 7, None)).all()


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_training_layout(block):
  length = 8
  seg = np.array([[0, 0, 0, 0, 0, 1, 1, -1]])
  m = _dense(masks.training(length, block, seg))
  b = lambda k: (k % length) // block
  s = lambda k: seg[0, k % length]
  for i in range(2 * length):
    for j in range(2 * length):
      qn, kn = i < length, j < length
      if qn and kn:
        rule = b(i) == b(j)
      elif qn:
        rule = b(i) > b(j)
      elif kn:
        rule = False
      else:
        rule = b(i) >= b(j)
      expect = rule and s(i) == s(j) and s(j) >= 0
      assert m[i, j] == expect, (i, j)


def test_training_rejects_indivisible_block():
  with pytest.raises(ValueError, match="does not divide"):
    masks.training(10, 4, np.zeros((1, 10), np.int32))


def test_concat_cache_then_window():
  cache = masks.Layout(np.array([[0, 0, 1, 1]]), np.zeros((1, 4), bool),
                       np.array([[0, 0, -1, -1]]))
  window = masks.block_causal(np.array([[4, 5]]), 2)
  m = np.asarray(masks.visible(window, cache.concat(window)))[0]
  np.testing.assert_array_equal(m, [[1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1]])
