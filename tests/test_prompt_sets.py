"""Prompt sets for EBPO (`llada_jax.train.prompt_sets`): record formats, bad records as one line
or skipped with a count, batches that depend only on (seed, index)."""

import json
import re

import pytest

from llada_jax.errors import InputError
from llada_jax.tokenizer import DEFAULT_CHAT_TEMPLATE
from llada_jax.train import data as D
from llada_jax.train.prompt_sets import PromptSource, parse_record

TOK = D.ByteTokenizer(chat_template=DEFAULT_CHAT_TEMPLATE)


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_record_formats():
  assert parse_record({"prompt": "2+2=", "answer": 4}, "f:1", "answer") == ("2+2=",
                                                                              {"answer": "4"})
  msgs = [{"role": "user", "content": "2+2="}]
  assert parse_record({"messages": msgs, "answer": "4"}, "f:1", "answer") == (msgs,
                                                                              {"answer": "4"})
  assert parse_record({"prompt": "f", "tests": "assert f() == 1"}, "f:1", "tests") == (
      "f", {"tests": ["assert f() == 1"]})


@pytest.mark.parametrize("rec, needs, words", [
    ({"answer": "4"}, "answer", "missing field 'prompt' (or 'messages')"),
    ({"prompt": "  ", "answer": "4"}, "answer", "empty prompt"),
    ({"prompt": "a"}, "answer", "missing field 'answer' (the reward needs it)"),
    ({"prompt": "a", "answer": ""}, "answer", "empty answer"),
    ({"prompt": "a", "answer": [1]}, "answer", "answer must be a string or a number"),
    ({"prompt": "a", "answer": "1"}, "tests", "missing field 'tests'"),
    ({"prompt": "a", "tests": []}, "tests", "tests must be Python source"),
    ({"prompt": 3, "answer": "1"}, "answer", "prompt must be a string or a list"),
])
def test_bad_records_name_the_line_or_are_counted(tmp_path, rec, needs, words):
  good = {"prompt": "1+1=", "answer": "2", "tests": "assert True"}
  path = _write(tmp_path / "p.jsonl", [good, rec])
  with pytest.raises(InputError, match=re.escape(words)) as e:
    PromptSource(path, TOK, seq_len=32, gen_length=8, batch_size=2, seed=0, needs=needs)
  assert "p.jsonl:2: " in str(e.value) and "\n" not in str(e.value)
  src = PromptSource(path, TOK, seq_len=32, gen_length=8, batch_size=2, seed=0, needs=needs,
                     bad_records="skip")
  assert (src.size, src.skipped) == (1, 1)


def test_a_prompt_that_leaves_no_room_for_the_response_is_bad(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "x" * 25, "answer": "1"}])
  with pytest.raises(InputError, match=r"p.jsonl:1: the prompt \(25 tokens\) leaves no room for "
                     r"ebpo.gen_length=8 response tokens in data.seq_len=32"):
    PromptSource(path, TOK, seq_len=32, gen_length=8, batch_size=1, seed=0)


def test_batches_are_resumable_and_chat_prompts_use_the_template(tmp_path):
  recs = [{"prompt": f"{i}+1=", "answer": i + 1} if i % 2 else
          {"messages": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)}
          for i in range(6)]
  path = _write(tmp_path / "p.jsonl", recs)
  a = PromptSource(path, TOK, seq_len=64, gen_length=8, batch_size=4, seed=5)
  got = [a.prompts() for _ in range(3)]  # two epochs of 6 records
  b = PromptSource(path, TOK, seq_len=64, gen_length=8, batch_size=4, seed=5)
  b.set_state(json.loads(json.dumps(dict(a.get_state(), index=1))))
  assert [b.prompts() for _ in range(2)] == got[1:]
  first_epoch = got[0][1] + got[1][1][:2]
  assert sorted(int(r["answer"]) for r in first_epoch) == list(range(1, 7))
  texts = {r["answer"]: TOK.decode(ids) for ids, r in zip(got[0][0], got[0][1])}
  for answer, text in texts.items():
    i = int(answer) - 1
    assert f"{i}+1=" in text and (text != f"{i}+1=") == (i % 2 == 0), text  # chat: templated
  with pytest.raises(InputError, match="prompt set had seed=4, this run has 5"):
    b.set_state(dict(a.get_state(), seed=4))


def test_prompts_from_a_tfds_dataset(tmp_path):
  """A prepared tfds dataset of prompts (text `prompt`, chat `messages` as a Sequence of
  role/content) with answers reads as the JSONL would."""
  from conftest import write_tfds
  plain = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
  chat = [{"messages": [{"role": "user", "content": f"{i}+2="}], "answer": str(i + 2)}
          for i in range(4)]
  for recs, feats, name in ((plain, {"prompt": "text", "answer": "text"}, "plain_prompts"),
                            (chat, {"messages": "messages", "answer": "text"}, "chat_prompts")):
    ds = write_tfds(recs, feats, tmp_path / name, name)
    jsonl = _write(tmp_path / f"{name}.jsonl", recs)
    got = {}
    for path in (ds, jsonl):
      src = PromptSource(path, TOK, seq_len=64, gen_length=8, batch_size=4, seed=0)
      ids, rows = src.prompts()
      got[path] = sorted((TOK.decode(x), r["answer"]) for x, r in zip(ids, rows))
    assert got[ds] == got[jsonl] and len(got[ds]) == 4
