"""The benchmark's toy tasks: held-out splits by prompt hash, and EOS padding of task rows."""

import random

import numpy as np
import pytest

from llada_jax.train import toy_tasks
from llada_jax.train.data import ByteTokenizer
from llada_jax.train.trainer import ConfigError, TaskSource, validate
from llada_jax.train.defaults import tiny_byte_config

TOK = ByteTokenizer(eos_id=256, pad_id=257, mask_id=258, vocab_size=264)


def test_old_tasks_draw_the_same_examples():
  """The variable-length options leave the default tasks' random streams unchanged."""
  rng = random.Random(7)
  old = []
  for _ in range(5):
    old.append("".join(rng.choice("abcdefghij") for _ in range(6)))
  assert [a for _, a in toy_tasks.examples("reverse", 5, 7)] == [s[::-1] for s in old]
  rng = random.Random(3)
  old = ["".join(rng.choice("0123456789") for _ in range(6)) for _ in range(5)]
  assert [p for p, _ in toy_tasks.examples("sort", 5, 3)] == [f"sort {s}=" for s in old]


@pytest.mark.parametrize("task", ["bench_add2", "bench_rev", "bench_sort", "bench_pick",
                                  "bench_mix"])
def test_splits_are_disjoint_and_answers_right(task):
  train = toy_tasks.examples(f"{task}@train", 400, 0)
  test = toy_tasks.unique_examples(f"{task}@test", 60, 1)
  assert len({p for p, _ in test}) == 60
  assert not {p for p, _ in train} & {p for p, _ in test}
  assert all(toy_tasks.in_test_split(p) for p, _ in test)
  assert not any(toy_tasks.in_test_split(p) for p, _ in train)
  for p, a in train + test:
    kind = toy_tasks.task_of(p)
    if kind == "add2":
      x, y = p[:-1].split("+")
      assert int(a) == int(x) + int(y) and int(x) < 100 and int(y) < 100
    elif kind == "rev":
      assert a == p[4:-1][::-1] and 3 <= len(a) <= 6
    elif kind == "pick":
      w1, w2 = toy_tasks.pick_options(p)
      assert a in (w1, w2) and len(w1) == len(w2) and 4 <= len(a) <= 6
      assert len(set(w1)) == len(set(w2)) == 1 and w1[0] != w2[0]
      assert toy_tasks.match_any(f" {a} ", f"{w1}|{w2}") == 1.0
      assert toy_tasks.match_any(w1[:-1] + "#", f"{w1}|{w2}") == 0.0
    else:
      assert a == "".join(sorted(p[5:-1])) and 3 <= len(a) <= 6
  if task != "bench_mix":
    assert {toy_tasks.task_of(p) for p, _ in train} == {task[len("bench_"):]}


def test_pick_draws_both_words():
  answers = [(a == toy_tasks.pick_options(p)[0]) for p, a in toy_tasks.examples("pick", 400, 0)]
  assert 150 < sum(answers) < 250


def test_bad_split_and_task_names():
  with pytest.raises(ValueError, match="split"):
    toy_tasks.get_task("bench_add2@valid")
  with pytest.raises(ValueError, match="unknown task"):
    toy_tasks.get_task("nope@train")


def test_task_rows_with_eos_padding_to_the_block_end():
  plain = TaskSource("bench_mix@train", TOK, 32, 16, 0, 8)
  padded = TaskSource("bench_mix@train", TOK, 32, 16, 0, 8, eos_padding="block")
  a, b = next(plain), next(padded)
  assert np.array_equal(a["tokens"][:, :1], b["tokens"][:, :1])
  for i in range(16):
    n = int(a["loss_mask"][i].sum() + (~a["loss_mask"][i] & (a["segment_ids"][i] >= 0)).sum())
    end = -(-n // 8) * 8  # the block end after the first EOS
    assert a["tokens"][i, n - 1] == TOK.eos_id and (a["segment_ids"][i, n:] == -1).all()
    assert np.array_equal(a["tokens"][i, :n], b["tokens"][i, :n])
    assert (b["tokens"][i, n:end] == TOK.eos_id).all() and b["loss_mask"][i, n:end].all()
    assert (b["segment_ids"][i, end:] == -1).all() and not b["loss_mask"][i, end:].any()


def test_eos_padding_is_validated():
  c = tiny_byte_config()
  c.data.eos_padding = "seq"
  with pytest.raises(ConfigError, match="eos_padding"):
    validate(c)
