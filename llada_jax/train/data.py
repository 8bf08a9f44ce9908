"""Data pipeline: corpora -> tensorflow-datasets array_record datasets -> grain batches. No TF.

Writing (`build_dataset`): a text file, a directory of files (each file one document) or a JSONL
file (`{"text"}`, `{"prompt", "response"}` or `{"messages": [{"role", "content"}, ...]}` per
line) becomes a tfds dataset prepared by a `tfds.core.GeneratorBasedBuilder` with
`file_format="array_record"`: `<out_dir>/<name>/1.0.0/{dataset_info.json, features.json,
metadata.json, <name>-<split>.array_record-*}`. tfds 4.9.10 writes array_record without TF.

Reading (`make_iterator`): `tfds.builder_from_directory(path).as_data_source(split)` (the
random-access `ArrayRecordDataSource` that `tfds.data_source` returns, without the name registry)
-> `grain.MapDataset` (shard, shuffle per epoch, repeat, tokenise) -> `grain.IterDataset`
(pretrain: concat-then-split packing with document ids; SFT: one example per row, or several
first-fit packed with `pack=True`) -> fixed-shape numpy batches `{tokens, segment_ids,
positions, loss_mask}`. The iterator is a `grain.DatasetIterator`: `get_state()`/`set_state()`
give exact resumption, and grain's orbax handler (`grain.checkpoint.CheckpointSave/
CheckpointRestore`) stores it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import grain
import numpy as np

from llada_jax.errors import InputError

VERSION = "1.0.0"
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_FIELDS = ("text", "prompt", "response", "messages")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_STATE_FORMAT = 1
# Settings added after states were first saved: a state without one was made with this value.
_SETTING_DEFAULTS = {"pack": False}


# --------------------------------------------------------------------------------- tokenizers


@runtime_checkable
class TextTokenizer(Protocol):
  """What the pipeline needs of a tokenizer. An optional `chat_template` (Jinja string) and
  `apply_chat_template(user_text) -> str` are used for SFT prompts when present."""
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    ...


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
  import jinja2
  return jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def _render_template(template: str, messages: Sequence[Mapping[str, str]]) -> str:
  """Renders `messages` + the assistant generation prompt, as `llada_jax.tokenizer` does."""
  return _compile_template(template).render(messages=list(messages), add_generation_prompt=True,
                                            bos_token="", eos_token="")


@dataclasses.dataclass
class ByteTokenizer:
  """UTF-8 bytes are ids 0-255; the special ids follow. For tests and tiny runs (e.g. the
  512-token fixture model: `ByteTokenizer(eos_id=510, pad_id=510, mask_id=511, vocab_size=512)`).
  """
  eos_id: int = 256
  pad_id: int = 257
  mask_id: int = 258
  vocab_size: int = 259
  chat_template: str | None = None

  def __post_init__(self):
    for k in ("eos_id", "pad_id", "mask_id"):
      v = getattr(self, k)
      if not 256 <= v < self.vocab_size:
        raise ValueError(f"ByteTokenizer {k}={v} must be in [256, vocab_size={self.vocab_size})")

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages) -> str:
    """One user turn (a string) or a list of chat messages, with the assistant prompt."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    return _render_template(self.chat_template, messages)


class TokenizerAdapter:
  """Gives any `encode`-able tokenizer (e.g. `llada_jax.tokenizer.Tokenizer`) the `eos_id` /
  `pad_id` the pipeline needs (take them from the model config: `eos_token_id`,
  `pad_token_id`); forwards `chat_template`, `apply_chat_template`, `decode`, `vocab_size`."""

  def __init__(self, tokenizer: Any, eos_id: int, pad_id: int | None = None):
    if not callable(getattr(tokenizer, "encode", None)):
      raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(str) method")
    self.tokenizer = tokenizer
    self.eos_id = int(eos_id)
    self.pad_id = int(eos_id if pad_id is None else pad_id)
    self.chat_template = getattr(tokenizer, "chat_template", None)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text))

  def __getattr__(self, name):  # decode, apply_chat_template, vocab_size, token_to_id, ...
    if name == "tokenizer":
      raise AttributeError(name)
    return getattr(self.tokenizer, name)


def _check_tokenizer(tok: Any) -> None:
  missing = [a for a in ("encode", "eos_id", "pad_id") if not hasattr(tok, a)]
  if missing:
    raise TypeError(f"tokenizer {type(tok).__name__} lacks {', '.join(missing)}; wrap it: "
                    "TokenizerAdapter(tok, eos_id=..., pad_id=...)")


# ---------------------------------------------------------------------------- reading corpora


def _is_binary(path: str) -> bool:
  with open(path, "rb") as f:
    return b"\0" in f.read(8192)


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _empty_record() -> dict[str, str]:
  return {k: "" for k in _FIELDS}


def _chat_record(obj: Mapping[str, Any], where: str) -> dict[str, str] | None:
  """Normalises a chat object (`messages` or `prompt`+`response`); None if it is not one."""
  rec = _empty_record()
  if "messages" in obj:
    msgs = obj["messages"]
    if (not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs)):
      raise ValueError(f"{where}: \"messages\" must be a non-empty list of "
                       "{\"role\": str, \"content\": str}")
    if msgs[-1]["role"] != "assistant":
      raise ValueError(f"{where}: the last message must have role \"assistant\" "
                       f"(got {msgs[-1]['role']!r})")
    if len(msgs) < 2:
      raise ValueError(f"{where}: \"messages\" needs at least one turn before the assistant's")
    rec["messages"] = json.dumps([{"role": m["role"], "content": m["content"]} for m in msgs],
                                 ensure_ascii=False)
    rec["response"] = msgs[-1]["content"]
    return rec
  if "prompt" in obj or "response" in obj:
    p, r = obj.get("prompt"), obj.get("response")
    if not isinstance(p, str) or not isinstance(r, str):
      raise ValueError(f"{where}: chat records need string \"prompt\" and \"response\"")
    rec["prompt"], rec["response"] = p, r
    return rec
  return None


def jsonl_objects(path: str, errors: str = "strict") -> Iterator[tuple[int, str, Any]]:
  """(line number, "path:line", parsed value) of every non-blank line of a JSONL file; a line
  that is not JSON is one `InputError` naming path:line. `errors`: how `open` decodes bad
  UTF-8."""
  with open(path, encoding="utf-8", errors=errors) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg})") from None
      yield lineno, where, obj


def _iter_jsonl(path: str, rel: str) -> Iterator[tuple[str, dict[str, str]]]:
  for lineno, where, obj in jsonl_objects(path, errors="replace"):
    if not isinstance(obj, dict):
      raise ValueError(f"{where}: each JSONL line must be an object")
    rec = _chat_record(obj, where) or _empty_record()
    if "text" in obj:
      if not isinstance(obj["text"], str):
        raise ValueError(f"{where}: \"text\" must be a string")
      rec["text"] = obj["text"]
    elif not (rec["response"] or rec["messages"] or rec["prompt"]):
      raise ValueError(f"{where}: a record needs \"text\", \"prompt\"+\"response\" or "
                       "\"messages\"")
    if rec["text"].strip() or rec["response"] or rec["messages"] or rec["prompt"]:
      yield f"{rel}:{lineno}", rec


def _iter_text(path: str, rel: str, doc_separator: str | None):
  text = _read_text(path)
  docs = [text] if doc_separator is None else text.split(doc_separator)
  for i, doc in enumerate(docs):
    if doc.strip():
      rec = _empty_record()
      rec["text"] = doc
      yield f"{rel}:{i}", rec


def _iter_source(source: str, *, doc_separator: str | None, glob: str):
  """Yields `(unique key, record)` for every document of `source`, in a fixed order."""
  if os.path.isdir(source):
    import pathlib
    root = pathlib.Path(source)
    files = sorted(p for p in root.glob(glob) if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
      rel = p.relative_to(root).as_posix()
      if p.suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(str(p), rel)
      elif not _is_binary(str(p)):
        yield from _iter_text(str(p), rel, doc_separator)
  elif os.path.isfile(source):
    rel = os.path.basename(source)
    if source.endswith(JSONL_SUFFIXES):
      yield from _iter_jsonl(source, rel)
    else:
      yield from _iter_text(source, rel, doc_separator)
  else:
    raise FileNotFoundError(f"data source not found: {source}")


def _key_hash(key: str, seed: int) -> int:
  return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


# ----------------------------------------------------------------------------- tfds writing


def _make_builder(name: str, data_dir: str, plan: dict, stats: dict, description: str):
  """A `GeneratorBasedBuilder` subclass named `name`, kept out of tfds's registry (so any
  name works, repeatedly), writing array_record."""
  import tensorflow_datasets as tfds

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=description,
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in _FIELDS}),
        metadata=tfds.core.MetadataDict(stats))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in plan}

  def _generate_examples(self, split):
    spec = plan[split]
    for key, rec in _iter_source(spec["source"], doc_separator=spec["doc_separator"],
                                 glob=spec["glob"]):
      keep = spec.get("keep")
      if keep is None or keep(key):
        yield key, rec

  attrs = dict(name=name, VERSION=tfds.core.Version(VERSION),
               RELEASE_NOTES={VERSION: "corpus converted by llada_jax.train.data"},
               _info=_info, _split_generators=_split_generators,
               _generate_examples=_generate_examples, __module__=__name__,
               # No source file (and no download checksums) for a generated builder; tfds's
               # lookup of it would also need the `importlib_resources` backport.
               code_path=None)
  cls = type(f"_Corpus_{name}", (tfds.core.GeneratorBasedBuilder,), attrs,
             skip_registration=True)
  return cls(data_dir=data_dir, file_format="array_record")


def _scan(spec: dict) -> tuple[np.ndarray, np.ndarray]:
  """Reads (and so validates) a split source: its documents' key hashes and is-chat flags."""
  hashes, chat = [], []
  for key, rec in _iter_source(spec["source"], doc_separator=spec["doc_separator"],
                               glob=spec["glob"]):
    hashes.append(_key_hash(key, spec["seed"]))
    chat.append(bool(rec["response"] or rec["messages"]))
  return np.asarray(hashes, np.uint64), np.asarray(chat, bool)


def build_dataset(source: str | os.PathLike | Mapping[str, str | os.PathLike], out_dir: str,
                  *, name: str = "text_corpus", validation_fraction: float = 0.0,
                  doc_separator: str | None = None, glob: str = "**/*", seed: int = 0,
                  overwrite: bool = False) -> str:
  """Converts a corpus into a tfds array_record dataset; returns its directory
  (`<out_dir>/<name>/1.0.0`), which `make_iterator` takes.

  `source`: a text file (one document, or several split at `doc_separator`, e.g. "\\n\\n"), a
  directory (every non-hidden, non-binary file matching `glob` is one document; `*.jsonl` files
  in it are read as JSONL), or a JSONL file (`text` / `prompt`+`response` / `messages` per
  line). A mapping `{split: source}` gives the splits explicitly; otherwise the split is
  `train`, plus `validation` holding `validation_fraction` of the documents (chosen by a
  seeded hash of their keys; at least one). Skips the work when the dataset is already
  prepared (unless `overwrite`)."""
  import tensorflow_datasets as tfds
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  sources = ({str(k): os.fspath(v) for k, v in source.items()} if isinstance(source, Mapping)
             else {"train": os.fspath(source)})
  if isinstance(source, Mapping) and validation_fraction:
    raise ValueError("give either a {split: source} mapping or validation_fraction, not both")
  for split, src in sources.items():
    if not os.path.exists(src):
      raise FileNotFoundError(f"data source not found: {src}")
    if not _NAME_RE.match(split):
      raise ValueError(f"split name {split!r} must be snake_case")
  out_dir = os.path.abspath(os.fspath(out_dir))
  out = os.path.join(out_dir, name, VERSION)
  if os.path.exists(os.path.join(out, "dataset_info.json")):
    if not overwrite:
      return out
    shutil.rmtree(out)

  plan, stats = {}, {}
  for split, src in sources.items():
    spec = dict(source=src, doc_separator=doc_separator, glob=glob, seed=seed)
    hashes, chat = _scan(spec)
    n = len(hashes)
    if n == 0:
      raise ValueError(f"empty corpus: no documents in {src}")
    if split == "train" and validation_fraction > 0:
      k = max(1, round(n * validation_fraction))
      if k >= n:
        raise ValueError(f"cannot hold out {k} of {n} documents of {src} for validation")
      cut = int(np.sort(hashes)[k - 1])
      held = hashes <= cut
      plan["train"] = dict(spec, keep=lambda key, c=cut, s=seed: _key_hash(key, s) > c)
      plan["validation"] = dict(spec, keep=lambda key, c=cut, s=seed: _key_hash(key, s) <= c)
      stats["train"] = dict(documents=int((~held).sum()), chat=int(chat[~held].sum()))
      stats["validation"] = dict(documents=int(held.sum()), chat=int(chat[held].sum()))
    else:
      plan[split] = spec
      stats[split] = dict(documents=n, chat=int(chat.sum()))
  description = "llada_jax corpus from " + ", ".join(f"{s}={p}" for s, p in sources.items())
  tfds.display_progress_bar(False)
  builder = _make_builder(name, out_dir, plan, dict(splits=stats), description)
  builder.download_and_prepare()
  for d in ("downloads/extracted", "downloads"):  # tfds makes these; nothing is downloaded
    try:
      os.rmdir(os.path.join(out_dir, d))
    except OSError:
      pass
  return out


# ----------------------------------------------------------------------------- tfds reading


def _resolve_dataset_dir(path: str) -> str:
  """The versioned dataset directory for a path given to `make_iterator`: that directory, a
  `<data_dir>/<name>` (newest version) or a `<data_dir>` holding exactly one dataset."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  if os.path.isdir(path):
    versions = [d for d in os.listdir(path)
                if os.path.isfile(os.path.join(path, d, "dataset_info.json"))]
    if versions:
      best = max(versions, key=lambda v: tuple(int(x) if x.isdigit() else -1
                                               for x in v.split(".")))
      return os.path.join(path, best)
    names = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and any(
        os.path.isfile(os.path.join(path, d, v, "dataset_info.json"))
        for v in os.listdir(os.path.join(path, d)) if os.path.isdir(os.path.join(path, d, v)))]
    if len(names) == 1:
      return _resolve_dataset_dir(os.path.join(path, names[0]))
    if len(names) > 1:
      raise ValueError(f"{path} holds several datasets ({', '.join(sorted(names))}); "
                       "pass one's directory")
  raise FileNotFoundError(f"no prepared dataset at {path} (run build_dataset first)")


def load_source(path: str, split: str):
  """`(ArrayRecordDataSource, metadata dict)` of a prepared dataset's split."""
  import tensorflow_datasets as tfds
  ds_dir = _resolve_dataset_dir(path)
  builder = tfds.builder_from_directory(ds_dir)
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {ds_dir} (has {', '.join(builder.info.splits)})")
  meta = dict(builder.info.metadata or {})
  return builder.as_data_source(split=split), meta.get("splits", {}).get(split, {})


# --------------------------------------------------------------------------- transformations


def _s(x) -> str:
  return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _pretrain_text(rec: Mapping[str, Any]) -> str:
  text = _s(rec.get("text", b""))
  if text:
    return text
  if rec.get("messages"):
    return "\n".join(m["content"] for m in json.loads(_s(rec["messages"])))
  return "\n".join(x for x in (_s(rec.get("prompt", b"")), _s(rec.get("response", b""))) if x)


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
  """The prompt text before the answer: the chat template with the generation prompt when the
  tokenizer has one (its `apply_chat_template`, as Hugging Face renders it), else the raw
  contents."""
  template = getattr(tokenizer, "chat_template", None)
  if template:
    if callable(getattr(tokenizer, "apply_chat_template", None)):
      return tokenizer.apply_chat_template([dict(m) for m in messages])
    return _render_template(template, messages)
  return "\n".join(m["content"] for m in messages)


class _Tokenize:
  """Pretraining: record -> {"tokens": ids of its text + EOS}."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, rec):
    ids = list(self.tokenizer.encode(_pretrain_text(rec))) + [self.tokenizer.eos_id]
    return {"tokens": np.asarray(ids, np.int32)}


class _FinishPacked:
  """Concat-then-split or packing output -> the batch row format (0-based segment ids, -1 on
  padding; positions restart at 0 per document). Rows without a packed `loss_mask` (pretrain)
  train every real token."""

  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def __call__(self, el):
    seg = el["tokens_segment_ids"].astype(np.int32) - 1
    valid = seg >= 0
    mask = valid & el["loss_mask"].astype(bool) if "loss_mask" in el else valid
    return {"tokens": np.where(valid, el["tokens"], self.pad_id).astype(np.int32),
            "segment_ids": seg, "positions": np.where(valid, el["tokens_positions"], 0)
            .astype(np.int32), "loss_mask": mask}


class _SftRow:
  """Chat record -> one row: template(prompt) + response + EOS, truncated to `seq_len`, padded;
  loss only on the response (and, with `train_block_padding`, on the pad tokens up to the next
  multiple of `block_length`). With `variable_length` (for packing), the example unpadded
  instead: `{tokens, loss_mask}` of its length (up to EOS, or the block-padded end)."""

  def __init__(self, tokenizer, seq_len: int, block_length: int, train_block_padding: bool,
               variable_length: bool = False):
    self.tokenizer, self.seq_len, self.block_length = tokenizer, seq_len, block_length
    self.train_block_padding = train_block_padding
    self.variable_length = variable_length

  def __call__(self, rec):
    tok = self.tokenizer
    if rec.get("messages"):
      msgs = json.loads(_s(rec["messages"]))
      prompt_msgs, response = msgs[:-1], msgs[-1]["content"]
    else:
      prompt_msgs = [{"role": "user", "content": _s(rec.get("prompt", b""))}]
      response = _s(rec.get("response", b""))
      if not response and not prompt_msgs[0]["content"]:
        return None  # a plain-text document in a mixed corpus: not an SFT example
    prompt = list(tok.encode(render_prompt(tok, prompt_msgs)))
    ids = (prompt + list(tok.encode(response)) + [tok.eos_id])[: self.seq_len]
    n, n_prompt = len(ids), min(len(prompt), len(ids))
    if n_prompt == n:
      return None  # the prompt fills the row: nothing to train on
    end = n
    if self.train_block_padding:
      end = min(self.seq_len, -(-n // self.block_length) * self.block_length)
    length = end if self.variable_length else self.seq_len
    tokens = np.full(length, tok.pad_id, np.int32)
    tokens[:n] = ids
    mask = np.zeros(length, bool)
    mask[n_prompt:end] = True
    if self.variable_length:
      return {"tokens": tokens, "loss_mask": mask}
    seg = np.full(self.seq_len, -1, np.int32)
    seg[:end] = 0
    pos = np.zeros(self.seq_len, np.int32)
    pos[:end] = np.arange(end)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


class _PadBatch:
  """Stacks rows; a short final batch (finite epochs) is filled with empty padding rows, so
  every batch has the same shape."""

  def __init__(self, batch_size: int, seq_len: int, pad_id: int):
    self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id

  def __call__(self, rows):
    rows = list(rows)
    while len(rows) < self.batch_size:
      rows.append({"tokens": np.full(self.seq_len, self.pad_id, np.int32),
                   "segment_ids": np.full(self.seq_len, -1, np.int32),
                   "positions": np.zeros(self.seq_len, np.int32),
                   "loss_mask": np.zeros(self.seq_len, bool)})
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _DropNone(grain.IterDataset):
  """Skips the `None`s of rows that `_SftRow` rejects; fails (rather than spin forever) when
  `limit` come in a row, i.e. when no example of the split fits."""

  def __init__(self, parent: grain.IterDataset, limit: int, why: str):
    super().__init__(parent)
    self.limit, self.why = limit, why

  def __iter__(self):
    return _DropNoneIterator(self._parent.__iter__(), self.limit, self.why)


class _DropNoneIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, limit: int, why: str):
    super().__init__(parent)
    self.limit, self.why = limit, why

  def __next__(self):
    for _ in range(self.limit):
      el = next(self._parent)
      if el is not None:
        return el
    raise ValueError(self.why)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


# ---------------------------------------------------------------------------------- iterator


def _fix_json_state(state):
  """JSON turns grain's concat-then-split `remainder_slices` tuples into lists, which its
  `set_state` then misreads (it compares with a tuple): turn them back."""
  if isinstance(state, dict):
    return {k: ({kk: tuple(vv) for kk, vv in v.items()} if k == "remainder_slices"
                and isinstance(v, dict) else _fix_json_state(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_fix_json_state(v) for v in state]
  return state


class DataIterator(grain.DatasetIterator):
  """The pipeline's iterator: `next()` gives a batch dict; `get_state()` is a JSON-able dict
  (grain's state plus the pipeline settings, checked on `set_state`)."""

  def __init__(self, inner: grain.DatasetIterator, settings: dict):
    super().__init__(inner)
    self._inner = inner
    self.settings = settings

  def __next__(self):
    return next(self._inner)

  def get_state(self) -> dict:
    return {"format": _STATE_FORMAT, "settings": self.settings, "grain": self._inner.get_state()}

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
      raise ValueError("not a llada_jax data iterator state")
    saved = json.loads(json.dumps({**_SETTING_DEFAULTS, **state["settings"]}))
    mine = json.loads(json.dumps(self.settings))
    if saved != mine:
      diff = {k: (saved.get(k), mine.get(k)) for k in set(saved) | set(mine)
              if saved.get(k) != mine.get(k)}
      raise ValueError(f"data iterator state is for other settings (saved, now): {diff}")
    self._inner.set_state(_fix_json_state(state["grain"]))


def iterator_state(it: DataIterator) -> dict:
  """A JSON-serialisable snapshot; `json.dumps` it to store as bytes."""
  return it.get_state()


def restore_iterator(it: DataIterator, state: dict | bytes | str) -> DataIterator:
  """Sets `it` (built by `make_iterator` with the same settings) to `state`; returns it."""
  it.set_state(state)
  return it


def make_iterator(data_dir_or_dataset_path: str, *, split: str, tokenizer: TextTokenizer,
                  seq_len: int, batch_size: int, seed: int = 0, kind: str = "pretrain",
                  block_length: int = 1, shuffle: bool = True, num_epochs: int | None = None,
                  worker_count: int = 0, shard_index: int = 0, shard_count: int = 1,
                  read_threads: int = 2, train_block_padding: bool = False,
                  pack: bool = False) -> DataIterator:
  """A checkpointable iterator of numpy batches `{tokens, segment_ids, positions, loss_mask}`
  (each `[batch_size, seq_len]`; int32, int32, int32, bool).

  `kind="pretrain"`: documents (text + EOS) packed back to back into rows, split across rows
  when long; `segment_ids` number the documents of a row from 0 (a split document restarts at
  position 0 in its next row), -1 on the padding of the final row. `kind="sft"`: one chat
  example per row, loss on the response + EOS only (`train_block_padding`: and on the pad
  tokens up to the next multiple of `block_length`); examples longer than `seq_len` are
  truncated. `kind="sft", pack=True`: several examples per row, placed by grain's first-fit
  packing over `batch_size` rows at a time (in order, not reshuffled); each example starts at a
  multiple of `block_length` (the training layout takes its blocks from the row index, so an
  example's blocks are those of an unpacked row and no block holds two examples), its
  `segment_ids` number the examples of the row from 0 and its `positions` restart at 0; the
  gaps are padding (-1). `num_epochs=None` repeats forever (each epoch reshuffled); a finite
  run ends with a batch filled up by padding rows.
  `worker_count>0` tokenises in that many processes (the batch order then depends on it).
  `shard_index/shard_count`: this host's share of the documents (e.g. `jax.process_index()`).
  """
  if kind not in ("pretrain", "sft"):
    raise ValueError(f"kind={kind!r}: expected 'pretrain' or 'sft'")
  if pack and kind != "sft":
    raise ValueError(f"pack=True is for kind='sft' (kind={kind!r} rows are always packed, "
                     "documents back to back)")
  if seq_len <= 0 or batch_size <= 0 or block_length <= 0:
    raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}, block_length={block_length} "
                     "must be positive")
  if seq_len % block_length:
    raise ValueError(f"seq_len={seq_len} is not a multiple of block_length={block_length}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs={num_epochs} must be positive or None")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
  _check_tokenizer(tokenizer)
  source, stats = load_source(data_dir_or_dataset_path, split)
  if len(source) == 0:
    raise ValueError(f"empty split {split!r} in {data_dir_or_dataset_path}")
  if kind == "sft" and stats.get("chat", 1) == 0:
    raise ValueError(f"kind='sft' needs chat records (prompt/response or messages); "
                     f"split {split!r} of {data_dir_or_dataset_path} has none")

  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  n_docs = len(ds)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if kind == "pretrain":
    ds = ds.map(_Tokenize(tokenizer))
  else:
    ds = ds.map(_SftRow(tokenizer, seq_len, block_length, train_block_padding,
                        variable_length=pack))
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(16, batch_size * 4))
  it = ds.to_iter_dataset(read, allow_nones=kind == "sft")
  if kind == "sft":
    # 2n + 1 rejections in a row span a whole epoch: no example fits.
    it = _DropNone(it, 2 * n_docs + 1,
                   f"no SFT example of split {split!r} fits seq_len={seq_len} (every prompt "
                   "fills the row) in " + os.fspath(data_dir_or_dataset_path))
  if kind == "pretrain":
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len})
    it = it.map(_FinishPacked(tokenizer.pad_id))
  elif pack:
    lengths = {"tokens": seq_len, "loss_mask": seq_len}
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=batch_size, shuffle_bins=False,
        pack_alignment_struct={k: block_length for k in lengths},
        padding_struct={"tokens": tokenizer.pad_id, "loss_mask": False})
    it = it.map(_FinishPacked(tokenizer.pad_id))
  it = it.batch(batch_size, batch_fn=_PadBatch(batch_size, seq_len, tokenizer.pad_id))
  if worker_count > 0:
    from absl import flags  # grain's workers read its absl flags: use their defaults unless an
    if not flags.FLAGS.is_parsed():  # absl app parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  settings = dict(split=split, kind=kind, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  block_length=block_length, shuffle=shuffle, num_epochs=num_epochs,
                  worker_count=worker_count, shard_index=shard_index, shard_count=shard_count,
                  train_block_padding=train_block_padding, pack=pack,
                  num_records=len(source))
  return DataIterator(iter(it), settings)
