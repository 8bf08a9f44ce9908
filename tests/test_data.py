"""Data pipeline: tfds array_record datasets (no TF) -> grain packing/SFT rows -> exact resume."""

import json
import os
import sys

import numpy as np
import pytest

from llada_jax.tokenizer import DEFAULT_CHAT_TEMPLATE
from llada_jax.train import data as D

TOK = D.ByteTokenizer(chat_template=DEFAULT_CHAT_TEMPLATE)
EOS, PAD = TOK.eos_id, TOK.pad_id

DOCS = {f"pkg/mod{i}.py": "".join(f"def f{i}_{j}():\n    return {i * j}\n" for j in range(i + 1))
        for i in range(7)}
CHATS = [{"prompt": "2+2=", "response": "4"},
         {"prompt": "Say hi to Ann", "response": "Hi, Ann! How are you today?"},
         {"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "capital of France?"},
                       {"role": "assistant", "content": "Paris"}]},
         {"prompt": "long " * 6, "response": "tail" * 5}]  # truncated to seq_len=64


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpora")
  src = root / "code"
  for rel, text in DOCS.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text(text)
  (src / ".hidden.py").write_text("hidden")
  (src / "blob.bin").write_bytes(b"\0\1\2")
  text_path = D.build_dataset(src, root / "out", name="code")
  jl = root / "mixed.jsonl"
  jl.write_text("\n".join(json.dumps(r) for r in
                          [{"text": "plain document one"}] + CHATS + [{"text": "two"}]
                          + [{"prompt": "x" * 100, "response": "no room"}]) + "\n")
  mixed_path = D.build_dataset(jl, root / "out", name="mixed")
  return dict(root=root, code=text_path, mixed=mixed_path, src=src)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_no_tensorflow_and_layout(corpora):
  assert "tensorflow" not in sys.modules
  files = sorted(os.listdir(corpora["code"]))
  assert "dataset_info.json" in files and any(".array_record-" in f for f in files)
  assert not os.path.exists(corpora["root"] / "out" / "downloads")


def test_pretrain_packing_invariants(corpora):
  seq_len, B = 48, 3
  it = D.make_iterator(corpora["code"], split="train", tokenizer=TOK, seq_len=seq_len,
                       batch_size=B, seed=0, block_length=16, shuffle=False, num_epochs=1)
  batches = list(it)
  rows = [{k: b[k][r] for k in b} for b in batches for r in range(B)]
  for b in batches:
    assert b["tokens"].shape == (B, seq_len) and b["tokens"].dtype == np.int32
    assert b["segment_ids"].dtype == np.int32 and b["positions"].dtype == np.int32
    assert b["loss_mask"].dtype == bool
  stream = []
  for i, row in enumerate(rows):
    tok, seg, pos, mask = row["tokens"], row["segment_ids"], row["positions"], row["loss_mask"]
    valid = seg >= 0
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any()  # padding only at the row's tail
    assert n == seq_len or all(not r["loss_mask"].any() for r in rows[i + 1:])  # only last row
    np.testing.assert_array_equal(mask, valid)
    assert (tok[~valid] == PAD).all() and (pos[~valid] == 0).all()
    if n:
      assert seg[0] == 0 and set(np.diff(seg[:n])) <= {0, 1}  # 0, 1, 2, ... contiguous
      for s in range(seg[n - 1] + 1):
        idx = np.nonzero(seg == s)[0]
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at each doc
        if s < seg[n - 1]:
          assert tok[idx[-1]] == EOS  # a document ending inside the row ends with EOS
    stream.extend(tok[:n].tolist())
  # The rows, read in order, are the documents back to back, each followed by EOS.
  assert stream[-1] == EOS
  docs = []
  for piece in np.split(np.asarray(stream), np.nonzero(np.asarray(stream) == EOS)[0] + 1)[:-1]:
    docs.append(bytes(piece[:-1].tolist()).decode())
  assert sorted(docs) == sorted(DOCS.values())  # hidden and binary files skipped


def test_determinism_and_epochs(corpora):
  kw = dict(split="train", tokenizer=TOK, seq_len=32, batch_size=2, block_length=8)
  a = _take(D.make_iterator(corpora["code"], seed=1, **kw), 12)
  b = _take(D.make_iterator(corpora["code"], seed=1, **kw), 12)
  c = _take(D.make_iterator(corpora["code"], seed=2, **kw), 12)
  _assert_same(a, b)
  assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))
  # One epoch of rows, then the next epoch (reshuffled) continues forever.
  total = sum(len(t) + 1 for t in DOCS.values())
  assert sum(int(x["loss_mask"].sum()) for x in a) == 12 * 2 * 32 > total


@pytest.mark.parametrize("kind,n,m", [("pretrain", 7, 9), ("sft", 3, 4)])
def test_exact_resume(corpora, kind, n, m):
  path = corpora["code"] if kind == "pretrain" else corpora["mixed"]
  kw = dict(split="train", tokenizer=TOK, seq_len=32, batch_size=2, seed=3, kind=kind,
            block_length=8)
  it = D.make_iterator(path, **kw)
  _take(it, n)
  saved = json.dumps(D.iterator_state(it)).encode()  # what a checkpoint stores
  expected = _take(it, m)
  fresh = D.restore_iterator(D.make_iterator(path, **kw), saved)
  _assert_same(_take(fresh, m), expected)


def test_resume_every_step(corpora):
  # States taken at each step (a split document's remainder buffered or not, across an epoch
  # end) survive a JSON round trip (grain's own concat-then-split `set_state` would misread
  # the JSON lists of an empty remainder).
  kw = dict(split="train", tokenizer=TOK, seq_len=16, batch_size=1, seed=0, block_length=8)
  it = D.make_iterator(corpora["code"], **kw)
  states, batches = [], []
  for _ in range(40):
    states.append(json.loads(json.dumps(D.iterator_state(it))))
    batches.append(next(it))
  slices = [tuple(s) for st in states for s in st["grain"]["remainder_slices"].values()]
  assert (-1, -1) in slices and any(s != (-1, -1) for s in slices)  # (-1, -1): none
  for step in range(0, 38, 3):
    fresh = D.restore_iterator(D.make_iterator(corpora["code"], **kw), states[step])
    _assert_same(_take(fresh, 2), batches[step:step + 2])


def test_orbax_grain_handler(corpora, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  kw = dict(split="train", tokenizer=TOK, seq_len=32, batch_size=2, seed=5, block_length=8)
  it = D.make_iterator(corpora["code"], **kw)
  _take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = D.make_iterator(corpora["code"], **kw)
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same(_take(fresh, 3), expected)


def _chat_parts(rec):
  if "messages" in rec:
    return rec["messages"][:-1], rec["messages"][-1]["content"]
  return [{"role": "user", "content": rec["prompt"]}], rec["response"]


@pytest.mark.parametrize("train_block_padding", [False, True])
def test_sft_rows(corpora, train_block_padding):
  seq_len, block = 64, 16
  it = D.make_iterator(corpora["mixed"], split="train", tokenizer=TOK, seq_len=seq_len,
                       batch_size=2, seed=0, kind="sft", block_length=block, shuffle=False,
                       num_epochs=1, train_block_padding=train_block_padding)
  rows = [{k: b[k][r] for k in b} for b in it for r in range(2)]
  expected = []
  for rec in CHATS:
    msgs, response = _chat_parts(rec)
    expected.append((TOK.encode(D.render_prompt(TOK, msgs)), TOK.encode(response) + [EOS]))
  real = [r for r in rows if (r["segment_ids"] >= 0).any()]
  assert len(real) == len(CHATS) and len(rows) == 4  # text / no-room records skipped
  for row in real:
    tok, seg, pos, mask = row["tokens"], row["segment_ids"], row["positions"], row["loss_mask"]
    (prompt, ids), = [(p, (p + a)[:seq_len]) for p, a in expected
                      if tok[:len((p + a)[:seq_len])].tolist() == (p + a)[:seq_len]]
    n, n_prompt = len(ids), len(prompt)
    assert (tok[n:] == PAD).all()
    assert not mask[:n_prompt].any()  # prompt (chat template included) never trained
    assert mask[n_prompt:n].all()  # response + EOS
    end = -(-n // block) * block if train_block_padding else n
    assert end % block == 0 or not train_block_padding
    assert (seg[:end] == 0).all() and (seg[end:] == -1).all()
    np.testing.assert_array_equal(pos[:end], np.arange(end))
    assert (pos[end:] == 0).all()
    assert mask[n:end].all() and not mask[end:].any()
  assert any(len(p) + len(a) > seq_len for p, a in expected)  # one was truncated
  for prompt, _ in expected:  # the chat template, with the generation prompt
    assert bytes(prompt).decode().startswith("<|") and bytes(prompt).decode().endswith(
        "<|assistant|>\n")


PACK_CHATS = ([{"prompt": f"q{i} " + "w" * (3 * i % 13), "response": f"a{i} " + "r" * (7 * i % 17)}
               for i in range(14)]
              + [{"messages": [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "capital of France?"},
                               {"role": "assistant", "content": "Paris"}]},
                 {"prompt": "long " * 20, "response": "tail" * 10}])  # truncated to seq_len=128


@pytest.fixture(scope="module")
def chat_corpus(corpora):
  jl = corpora["root"] / "chats.jsonl"
  jl.write_text("\n".join(json.dumps(r) for r in [{"text": "plain document"}] + PACK_CHATS
                          + [{"prompt": "x" * 200, "response": "no room"}]) + "\n")
  return D.build_dataset(jl, corpora["root"] / "out", name="chats")


def _segments(row):
  """`(start, end)` of each example of a row, checking the row format on the way: segment ids
  0..k-1 in order, each contiguous, positions restarting at 0; padding elsewhere."""
  seg, pos = row["segment_ids"], row["positions"]
  spans = []
  for s in range(int(seg.max()) + 1):
    idx = np.nonzero(seg == s)[0]
    assert len(idx) and (np.diff(idx) == 1).all()  # contiguous
    assert not spans or idx[0] >= spans[-1][1]  # numbered in order
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart per example
    spans.append((int(idx[0]), int(idx[-1]) + 1))
  pad = seg < 0
  assert set(seg[~pad].tolist()) == set(range(len(spans)))
  assert (row["tokens"][pad] == PAD).all() and (pos[pad] == 0).all()
  assert not row["loss_mask"][pad].any()
  return spans


@pytest.mark.parametrize("train_block_padding", [False, True])
def test_sft_packing(chat_corpus, train_block_padding):
  seq_len, block, B = 128, 8, 3
  kw = dict(split="train", tokenizer=TOK, seq_len=seq_len, batch_size=B, seed=0, kind="sft",
            block_length=block, shuffle=False, num_epochs=1,
            train_block_padding=train_block_padding)
  rows = lambda it: [{k: b[k][r] for k in b} for b in it for r in range(B)]
  packed_it = D.make_iterator(chat_corpus, pack=True, **kw)
  assert packed_it.settings["pack"] is True
  packed = rows(packed_it)
  unpacked = rows(D.make_iterator(chat_corpus, **kw))
  example = lambda row, a, b: (tuple(row["tokens"][a:b].tolist()),
                               tuple(row["loss_mask"][a:b].tolist()))
  want = sorted(example(r, 0, int((r["segment_ids"] >= 0).sum())) for r in unpacked
                if (r["segment_ids"] >= 0).any())
  got, counts = [], []
  for row in packed:
    spans = _segments(row)
    counts.append(len(spans))
    for a, b in spans:
      assert a % block == 0  # every example starts a block
      if train_block_padding:
        assert (b - a) % block == 0  # and fills its last block (trained padding)
      got.append(example(row, a, b))
  # Every example (the truncated one included) is packed once, exactly as its unpacked row.
  assert sorted(got) == want and len(want) == len(PACK_CHATS)
  assert max(counts) >= 3 and sum(c > 0 for c in counts) < len(want)  # several per row
  # The loss mask is on exactly the response + EOS (+ the trained block padding).
  expected = {}
  for rec in PACK_CHATS:
    msgs, response = _chat_parts(rec)
    prompt = TOK.encode(D.render_prompt(TOK, msgs))
    ids = (prompt + TOK.encode(response) + [EOS])[:seq_len]
    expected[tuple(ids)] = len(prompt)
  assert any(len(ids) == seq_len and ids[-1] != EOS for ids in expected)  # one truncated
  for tokens, mask in got:
    (ids, n_prompt), = [(i, p) for i, p in expected.items() if tokens[:len(i)] == i]
    n = len(ids)
    assert len(tokens) == (min(seq_len, -(-n // block) * block) if train_block_padding else n)
    assert set(tokens[n:]) <= {PAD}
    assert mask == (False,) * n_prompt + (True,) * (len(tokens) - n_prompt)


def test_sft_packing_resume(chat_corpus):
  kw = dict(split="train", tokenizer=TOK, seq_len=128, batch_size=2, seed=3, kind="sft",
            block_length=8, pack=True, train_block_padding=True)
  it = D.make_iterator(chat_corpus, **kw)  # shuffled, repeating epochs
  states, batches = [], []
  for _ in range(14):  # past an epoch (16 examples, 2-3 per row)
    states.append(json.dumps(D.iterator_state(it)).encode())
    batches.append(next(it))
  assert json.loads(states[0])["settings"]["pack"] is True
  for k in (0, 3, 8):
    fresh = D.restore_iterator(D.make_iterator(chat_corpus, **kw), states[k])
    _assert_same(_take(fresh, 5), batches[k:k + 5])
  with pytest.raises(ValueError, match="other settings.*pack"):
    D.make_iterator(chat_corpus, **dict(kw, pack=False)).set_state(states[3])
  # A state saved before `pack` was a setting restores into an unpacked iterator.
  old = D.make_iterator(chat_corpus, **dict(kw, pack=False))
  _take(old, 2)
  state = D.iterator_state(old)
  del state["settings"]["pack"]
  expected = _take(old, 2)
  fresh = D.restore_iterator(D.make_iterator(chat_corpus, **dict(kw, pack=False)), state)
  _assert_same(_take(fresh, 2), expected)


def test_validation_split_and_idempotent(tmp_path, corpora):
  path = D.build_dataset(corpora["src"], tmp_path, name="code_val", validation_fraction=0.3)
  stamp = os.path.getmtime(os.path.join(path, "dataset_info.json"))
  assert D.build_dataset(corpora["src"], tmp_path, name="code_val",
                         validation_fraction=0.3) == path
  assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == stamp
  texts = {}
  for split in ("train", "validation"):
    src, _ = D.load_source(tmp_path, split)  # a data_dir holding one dataset resolves too
    texts[split] = [src[i]["text"].decode() for i in range(len(src))]
  assert len(texts["validation"]) == 2 and not set(texts["train"]) & set(texts["validation"])
  assert sorted(texts["train"] + texts["validation"]) == sorted(DOCS.values())
  batches = list(D.make_iterator(path, split="validation", tokenizer=TOK, seq_len=256,
                                 batch_size=4, num_epochs=1, shuffle=False))
  total = sum(len(t) + 1 for t in texts["validation"])
  rows = -(-total // 256)
  assert len(batches) == 1 and batches[0]["tokens"].shape == (4, 256) and rows < 4
  assert batches[0]["loss_mask"].sum() == total
  assert (batches[0]["segment_ids"][rows:] == -1).all()  # short final batch: padding rows


def test_hf_tokenizer_adapter(corpora):
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
  from llada_jax.tokenizer import Tokenizer
  words = sorted({w for r in CHATS for t in ("prompt", "response") for w in r.get(t, "").split()}
                 | {"<|user|>", "<|assistant|>", "<|system|>", "be", "brief", "capital", "of",
                    "France?", "Paris"})
  vocab = {w: i for i, w in enumerate(["[UNK]"] + words)}
  hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = D.TokenizerAdapter(Tokenizer(hf, DEFAULT_CHAT_TEMPLATE), eos_id=len(vocab))
  assert tok.pad_id == tok.eos_id
  b = next(D.make_iterator(corpora["mixed"], split="train", tokenizer=tok, seq_len=32,
                           batch_size=4, kind="sft", block_length=8, shuffle=False))
  assert b["loss_mask"].any(axis=1).all()
  first = b["tokens"][np.arange(4), b["loss_mask"].argmax(1) - 1]
  assert (first == vocab["<|assistant|>"]).all()  # the answer follows the template's prompt


def test_errors(tmp_path, corpora):
  kw = dict(split="train", tokenizer=TOK, batch_size=2, block_length=8)
  messages = []
  raises = lambda *a, **k: _Collect(messages, pytest.raises(*a, **k))
  with raises(FileNotFoundError, match="nope.txt"):
    D.build_dataset(tmp_path / "nope.txt", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "blank.txt").write_text("  \n")
  with raises(ValueError, match="empty corpus"):
    D.build_dataset(tmp_path / "empty", tmp_path / "out")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"foo": 1}\n')
  with raises(ValueError, match="bad.jsonl:2"):
    D.build_dataset(bad, tmp_path / "out")
  bad.write_text('{"text": "ok"}\nnot json\n')
  with raises(ValueError, match="bad.jsonl:2: invalid JSON"):
    D.build_dataset(bad, tmp_path / "out")
  with raises(FileNotFoundError, match="no prepared dataset"):
    D.make_iterator(tmp_path / "missing", seq_len=32, **kw)
  with raises(ValueError, match="not a multiple of block_length"):
    D.make_iterator(corpora["code"], seq_len=30, **kw)
  with raises(ValueError, match="split 'test'"):
    D.make_iterator(corpora["code"], seq_len=32, **dict(kw, split="test"))
  with raises(ValueError, match="needs chat records"):
    D.make_iterator(corpora["code"], seq_len=32, kind="sft", **kw)
  with raises(ValueError, match="pack=True is for kind='sft'"):
    D.make_iterator(corpora["code"], seq_len=32, pack=True, **kw)
  big = tmp_path / "big.jsonl"
  big.write_text(json.dumps({"prompt": "x" * 100, "response": "y"}) + "\n")
  it = D.make_iterator(D.build_dataset(big, tmp_path / "out"), seq_len=32, kind="sft", **kw)
  with raises(ValueError, match="no SFT example"):
    next(it)
  it = D.make_iterator(corpora["code"], seq_len=32, seed=0, **kw)
  with raises(ValueError, match="other settings"):
    D.make_iterator(corpora["code"], seq_len=32, seed=1, **kw).set_state(it.get_state())
  assert len(messages) == 11 and all(m and "\n" not in m for m in messages), messages


class _Collect:
  """`pytest.raises` that also records the error's message (to check it is one line)."""

  def __init__(self, out, ctx):
    self.out, self.ctx = out, ctx

  def __enter__(self):
    self.info = self.ctx.__enter__()
    return self.info

  def __exit__(self, *exc):
    ok = self.ctx.__exit__(*exc)
    self.out.append(str(self.info.value))
    return ok


def test_worker_processes_resume(corpora):
  # Tokenising in a worker process: same batches as in-process on one worker, exact resume.
  kw = dict(split="train", tokenizer=TOK, seq_len=32, batch_size=2, seed=4, block_length=8)
  it = D.make_iterator(corpora["code"], worker_count=1, **kw)
  try:
    first = _take(it, 3)
    _assert_same(first, _take(D.make_iterator(corpora["code"], **kw), 3))
    state = json.dumps(D.iterator_state(it))
    expected = _take(it, 3)
  finally:
    it.close()
  fresh = D.restore_iterator(D.make_iterator(corpora["code"], worker_count=1, **kw), state)
  try:
    _assert_same(_take(fresh, 3), expected)
  finally:
    fresh.close()
