"""Preference pairs for ELBO-DPO from JSONL files or tfds datasets: `{"prompt", "chosen",
"rejected"}` records.

Formats (one JSON object per line; the common conventions of preference datasets):
  * plain text: `"prompt"`, `"chosen"`, `"rejected"` strings; the prompt is tokenised as it is;
  * conversational: `"prompt"` a list of chat messages (rendered with the tokenizer's chat
    template and the assistant prompt; their contents joined by newlines without a template),
    `"chosen"` / `"rejected"` strings or lists of assistant messages (their contents joined);
  * implicit prompt: no `"prompt"`; `"chosen"` and `"rejected"` whole conversations sharing
    every message but the last, which is the answer.
Each answer gets the EOS id appended; an empty answer is a bad record. Bad records and batching
by index (exact resume): `llada_jax.train.records`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llada_jax.errors import InputError
from llada_jax.train.records import IndexedBatches, read_records


def _text_of(x, where: str, field: str) -> str:
  if isinstance(x, str):
    return x
  if isinstance(x, list) and x and all(isinstance(m, dict) for m in x):
    parts = [m.get("content") for m in x if m.get("role", "assistant") == "assistant"]
    if parts and all(isinstance(p, str) for p in parts):
      return "".join(parts)
  raise InputError(f"{where}: {field} must be a string or a list of assistant messages "
                   "({'role': 'assistant', 'content': ...})")


def _is_messages(x) -> bool:
  return (isinstance(x, list) and bool(x)
          and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in x))


def parse_record(obj: Any, where: str) -> tuple[Any, str, str]:
  """(prompt: a string or a list of messages, chosen text, rejected text) of one record."""
  if not isinstance(obj, dict):
    raise InputError(f"{where}: a preference record must be a JSON object with prompt, chosen "
                     "and rejected")
  for field in ("chosen", "rejected"):
    if field not in obj:
      raise InputError(f"{where}: missing field {field!r} (a preference record needs prompt, "
                       "chosen and rejected)")
  prompt = obj.get("prompt")
  chosen, rejected = obj["chosen"], obj["rejected"]
  if prompt is None:  # implicit prompt: the conversations' shared messages
    if not (_is_messages(chosen) and _is_messages(rejected)):
      raise InputError(f"{where}: without a prompt, chosen and rejected must be whole "
                       "conversations (lists of messages)")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
      raise InputError(f"{where}: chosen and rejected must share every message but the last "
                       "(the answer)")
    return parse_record({"prompt": chosen[:-1], "chosen": chosen[-1:],
                         "rejected": rejected[-1:]}, where)
  if not (isinstance(prompt, str) or _is_messages(prompt)):
    raise InputError(f"{where}: prompt must be a string or a list of chat messages")
  if isinstance(prompt, str) and not prompt:
    raise InputError(f"{where}: empty prompt")
  chosen, rejected = _text_of(chosen, where, "chosen"), _text_of(rejected, where, "rejected")
  for field, text in (("chosen", chosen), ("rejected", rejected)):
    if not text.strip():
      raise InputError(f"{where}: empty {field} answer")
  return prompt, chosen, rejected


def read_pairs(path: str) -> list[tuple[Any, str, str]]:
  """Every record of a JSONL file (or of every `*.jsonl` file of a directory, in name order)."""
  return read_records(path, parse_record, what="preference pairs")[0]


class PairSource:
  """(chosen, rejected) batches of `batch_size` pairs (see the module doc). Records are
  tokenised once, here (`eos_block` > 0: each answer's EOS repeated to the end of its block of
  that length); a pair whose prompt and longer answer (with EOS) do not fit `seq_len` is
  a bad record (`bad_records`: "error" names its line, "skip" leaves it out and counts it in
  `skipped`)."""

  def __init__(self, path: str, tokenizer, seq_len: int, batch_size: int, seed: int,
               bad_records: str = "error", eos_block: int = 0):
    self.tok, self.seq_len, self.eos_block = tokenizer, seq_len, eos_block
    pairs, self.skipped = read_records(path, self._tokenise, what="preference pairs",
                                       bad_records=bad_records)
    self.pairs = [(i, *pair) for i, pair in enumerate(pairs)]  # (record id, prompt, c, r)
    self.batches = IndexedBatches(self.pairs, batch_size, seed, what="preference data")
    self.size = self.batches.size
    self.reference = None  # [records, 2] float32 once `attach_reference` is called

  def _tokenise(self, obj, where: str):
    prompt, chosen, rejected = parse_record(obj, where)
    p = self._prompt_ids(prompt)
    c = self.tok.encode(chosen) + [self.tok.eos_id]
    r = self.tok.encode(rejected) + [self.tok.eos_id]
    if self.eos_block:  # EOS up to the end of the answer's block (data.eos_padding="block")
      from llada_jax.train.ebpo import eos_pad  # noqa: PLC0415
      c, r = (eos_pad(p, a, self.eos_block, self.tok.eos_id) for a in (c, r))
    if len(p) + max(len(c), len(r)) > self.seq_len:
      raise InputError(f"{where}: the prompt ({len(p)} tokens) and the longer answer with EOS "
                       f"({max(len(c), len(r))}) do not fit data.seq_len={self.seq_len} (or set "
                       "data.bad_records=skip to leave such pairs out)")
    return p, c, r

  def _prompt_ids(self, prompt) -> list[int]:
    """Text as it is; messages through the chat template (raw contents without one), as SFT
    prompts are rendered (`llada_jax.train.data.render_prompt`)."""
    from llada_jax.train.data import render_prompt  # noqa: PLC0415
    return self.tok.encode(prompt if isinstance(prompt, str) else render_prompt(self.tok, prompt))

  def next_pair(self) -> tuple[dict, dict]:
    """The next (chosen, rejected) batches; each row's `record` id, and its reference ELBO
    `ref_elbo` once `attach_reference` gave them."""
    return self._pair(self.batches.next_records())

  def _pair(self, recs) -> tuple[dict, dict]:
    from llada_jax.train.ebpo import build_batch  # noqa: PLC0415
    ids = np.asarray([i for i, *_ in recs], np.int32)
    prompts = [p for _, p, _, _ in recs]
    out = []
    for side, answers in enumerate(([c for *_, c, _ in recs], [r for *_, r in recs])):
      batch = dict(build_batch(prompts, answers, self.seq_len, self.tok.pad_id), record=ids)
      if self.reference is not None:
        batch["ref_elbo"] = self.reference[ids, side]
      out.append(batch)
    return tuple(out)

  def ordered_pairs(self, batch_size: int):
    """Every record once, in file order, as (chosen, rejected) batches of `batch_size` rows (the
    last one filled up with copies of its last record) and the number of real rows in each."""
    for lo in range(0, self.size, batch_size):
      recs = self.pairs[lo:lo + batch_size]
      yield self._pair(recs + [recs[-1]] * (batch_size - len(recs))), len(recs)

  def attach_reference(self, table: np.ndarray) -> None:
    """The reference ELBOs `[records, 2]` (chosen, rejected) of every record, by record id."""
    if table.shape != (self.size, 2):
      raise ValueError(f"reference table {table.shape} for {self.size} pairs")
    self.reference = np.asarray(table, np.float32)

  def get_state(self) -> dict:
    return self.batches.get_state()

  def set_state(self, state: dict) -> None:
    self.batches.set_state(state)
