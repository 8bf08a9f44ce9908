"""Preference pairs for ELBO-DPO (`llada_jax.train.preferences`): record formats, one-line errors
for bad records, and batches that depend only on (seed, index) (exact resume)."""

import json

import numpy as np
import pytest

from llada_jax.errors import InputError
from llada_jax.train import data as D
from llada_jax.train.preferences import PairSource, parse_record, read_pairs
from conftest import write_tfds
from llada_jax.train.trainer import ConfigError, validate
from llada_jax.train.defaults import tiny_byte_config
from llada_jax.tokenizer import DEFAULT_CHAT_TEMPLATE

TOK = D.ByteTokenizer(chat_template=DEFAULT_CHAT_TEMPLATE)
USER = {"role": "user", "content": "2+2="}


def test_record_formats():
  assert parse_record({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "f:1") == (
      "2+2=", "4", "5")
  conv = parse_record({"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": "5"}, "f:2")
  assert conv == ([USER], "4", "5")
  implicit = parse_record({"chosen": [USER, {"role": "assistant", "content": "4"}],
                           "rejected": [USER, {"role": "assistant", "content": "5"}]}, "f:3")
  assert implicit == ([USER], "4", "5")


@pytest.mark.parametrize("line, words", [
    ("not json", "f.jsonl:1: invalid JSON"),
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', "empty prompt"),
    ('{"prompt": 3, "chosen": "b", "rejected": "c"}', "prompt must be a string or a list"),
    ('{"prompt": "a", "chosen": 4, "rejected": "c"}', "chosen must be a string"),
    ('{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
     '"rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}]}',
     "must share every message but the last"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_records_are_one_line(tmp_path, line, words):
  f = tmp_path / "f.jsonl"
  f.write_text(line + "\n")
  with pytest.raises(InputError, match=words) as e:
    read_pairs(str(f))
  assert "\n" not in str(e.value) and "f.jsonl:1" in str(e.value)


def _pairs(tmp_path, n=10):
  f = tmp_path / "pairs.jsonl"
  with open(f, "w") as out:
    for i in range(n):
      rec = ({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} if i % 2 else
             {"prompt": [{"role": "user", "content": f"{i}+1="}], "chosen": str(i + 1),
              "rejected": str(i + 2)})
      out.write(json.dumps(rec) + "\n")
  return str(f)


def test_pair_batches_are_resumable_and_cover_every_record(tmp_path):
  path = _pairs(tmp_path)
  a = PairSource(path, TOK, seq_len=48, batch_size=5, seed=3)
  batches = [a.next_pair() for _ in range(4)]  # two epochs of 10 records
  b = PairSource(path, TOK, seq_len=48, batch_size=5, seed=3)
  state = dict(a.get_state(), index=2)
  b.set_state(json.loads(json.dumps(state)))
  for (c1, r1), (c2, r2) in zip(batches[2:], [b.next_pair() for _ in range(2)]):
    for k in c1:
      np.testing.assert_array_equal(c1[k], c2[k])
      np.testing.assert_array_equal(r1[k], r2[k])
  chosen, rejected = batches[0]
  # the prompt rows agree and the answers (with EOS) are the loss positions
  np.testing.assert_array_equal(chosen["tokens"][~chosen["loss_mask"] & (chosen["segment_ids"]
                                                                         >= 0)],
                                rejected["tokens"][~rejected["loss_mask"]
                                                   & (rejected["segment_ids"] >= 0)])
  first_epoch = {bytes(row[m]) for c, _ in batches[:2] for row, m in
                 zip(c["tokens"].astype(np.uint8), c["loss_mask"])}
  assert len(first_epoch) == 10  # each record once per epoch (answers i+1 with EOS differ)
  prompt_text = TOK.decode(chosen["tokens"][0][~chosen["loss_mask"][0]
                                               & (chosen["segment_ids"][0] >= 0)])
  assert "+1=" in prompt_text


def test_long_or_empty_pairs_are_bad_records_and_resume_checks_the_data(tmp_path, capsys):
  path = _pairs(tmp_path)
  with open(path, "a") as f:
    f.write(json.dumps({"prompt": "x" * 100, "chosen": "a", "rejected": "b"}) + "\n")
    f.write(json.dumps({"prompt": "y", "chosen": " ", "rejected": "b"}) + "\n")
  with pytest.raises(InputError, match=r"pairs.jsonl:11: the prompt \(100 tokens\) and the "
                     r"longer answer with EOS \(2\) do not fit data.seq_len=48"):
    PairSource(path, TOK, seq_len=48, batch_size=5, seed=3)
  src = PairSource(path, TOK, seq_len=48, batch_size=5, seed=3, bad_records="skip")
  assert src.size == 10 and src.skipped == 2
  assert "2 bad records of" in capsys.readouterr().out
  with pytest.raises(InputError, match="batch_size=4, this run has 5"):
    src.set_state(dict(src.get_state(), batch_size=4))
  with pytest.raises(InputError, match=r"holds no usable preference pairs \(12 bad records"):
    PairSource(path, TOK, seq_len=4, batch_size=5, seed=3, bad_records="skip")
  with pytest.raises(InputError, match="pairs.jsonl:12: empty chosen answer"):
    read_pairs(path)


def test_dpo_config_needs_pairs_or_a_task(tmp_path):
  c = tiny_byte_config("dpo")
  c.data.task = ""
  with pytest.raises(ConfigError, match="stage dpo needs data.source"):
    validate(c)
  c.data.source = _pairs(tmp_path)
  validate(c)


def test_pairs_from_a_tfds_dataset_equal_the_same_jsonl(tmp_path):
  """A prepared tfds (array_record) dataset of preference pairs reads as the same JSONL would
  (in tfds's order: it shuffles examples by key when writing): text features as strings, a
  Sequence of role/content as chat messages; a bad record names the dataset, split and index."""
  msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  recs = [{"chosen": msgs(f"{i}+1=", str(i + 1)), "rejected": msgs(f"{i}+1=", str(i + 2))}
          for i in range(6)]
  conv = write_tfds(recs, {"chosen": "messages", "rejected": "messages"}, tmp_path / "d1",
                    "conv_pairs")
  jsonl = tmp_path / "conv.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
  canon = lambda pairs: sorted(json.dumps(p, sort_keys=True) for p in pairs)  # tfds reorders
  assert canon(read_pairs(conv)) == canon(read_pairs(str(jsonl)))
  plain = [{"prompt": f"{i}*2=", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
           for i in range(5)]
  text = write_tfds(plain, {"prompt": "text", "chosen": "text", "rejected": "text"},
                    tmp_path / "d2", "text_pairs")
  assert canon(read_pairs(text)) == canon([(r["prompt"], r["chosen"], r["rejected"])
                                          for r in plain])
  src = PairSource(text, TOK, seq_len=32, batch_size=2, seed=0)
  assert src.size == 5
  bad = write_tfds([{"prompt": "a", "chosen": "", "rejected": "c"}],
                   {"prompt": "text", "chosen": "text", "rejected": "text"}, tmp_path / "d3",
                   "bad_pairs")
  with pytest.raises(InputError, match=r"bad_pairs/1.0.0\[train\]#0: missing field 'chosen'"):
    read_pairs(bad)  # tfds stores every feature: an empty one is a field left out
