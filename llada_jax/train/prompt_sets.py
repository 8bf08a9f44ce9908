"""Prompt sets with verifiable answers for EBPO, from JSONL files.

One JSON object per line:
  * the prompt: `"prompt"` (a string, tokenised as it is, or a list of chat messages) or
    `"messages"` (a list of chat messages); messages are rendered with the tokenizer's chat
    template and the assistant prompt (their contents joined by newlines without a template);
  * what the reward checks (`llada_jax.train.rewards.REQUIRED_FIELDS`): `"answer"` (a string or a
    number) for `exact_match`, `math`, `char_overlap`, `match_any`; `"tests"` (Python source, or a
    list of sources) for `code`.
A record without the field its reward needs, with an empty prompt, or whose prompt leaves no room
for `gen_length` response tokens in `seq_len` is a bad record (`llada_jax.train.records`: one
line naming the file and line, or left out and counted). Batches by index (exact resume):
`records.IndexedBatches`.
"""

from __future__ import annotations

from typing import Any

from llada_jax.errors import InputError
from llada_jax.train.records import IndexedBatches, read_records


def _is_messages(x) -> bool:
  return (isinstance(x, list) and bool(x)
          and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in x))


def parse_record(obj: Any, where: str, needs: str) -> tuple[Any, dict]:
  """(prompt: a string or a list of messages, the record's reward fields) of one record; `needs`
  is the field the reward reads."""
  if not isinstance(obj, dict):
    raise InputError(f"{where}: a prompt record must be a JSON object with prompt (or messages) "
                     f"and {needs}")
  prompt = obj.get("prompt", obj.get("messages"))
  if prompt is None:
    raise InputError(f"{where}: missing field 'prompt' (or 'messages')")
  if not (isinstance(prompt, str) or _is_messages(prompt)):
    raise InputError(f"{where}: prompt must be a string or a list of chat messages "
                     "({'role': ..., 'content': ...})")
  if isinstance(prompt, str) and not prompt.strip():
    raise InputError(f"{where}: empty prompt")
  if needs not in obj:
    raise InputError(f"{where}: missing field {needs!r} (the reward needs it)")
  value = obj[needs]
  if needs == "answer":
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
      raise InputError(f"{where}: answer must be a string or a number")
    value = str(value)
    if not value.strip():
      raise InputError(f"{where}: empty answer")
  elif needs == "tests":
    if isinstance(value, str):
      value = [value]
    if not (isinstance(value, list) and value and all(isinstance(t, str) and t.strip()
                                                      for t in value)):
      raise InputError(f"{where}: tests must be Python source or a non-empty list of sources")
  return prompt, {needs: value}


class PromptSource:
  """Batches of `batch_size` prompts and their reward fields (module doc); `prompts()` returns
  (token ids per prompt, the records the reward reads)."""

  def __init__(self, path: str, tokenizer, seq_len: int, gen_length: int, batch_size: int,
               seed: int, needs: str = "answer", bad_records: str = "error"):
    self.tok, self.seq_len, self.gen_length, self.needs = tokenizer, seq_len, gen_length, needs
    rows, self.skipped = read_records(path, self._tokenise, what="prompts",
                                      bad_records=bad_records)
    self.batches = IndexedBatches(rows, batch_size, seed, what="prompt set")
    self.size = self.batches.size

  def _tokenise(self, obj, where: str):
    from llada_jax.train.data import render_prompt  # noqa: PLC0415
    prompt, fields = parse_record(obj, where, self.needs)
    ids = self.tok.encode(prompt if isinstance(prompt, str) else render_prompt(self.tok, prompt))
    if len(ids) + self.gen_length > self.seq_len:
      raise InputError(f"{where}: the prompt ({len(ids)} tokens) leaves no room for "
                       f"ebpo.gen_length={self.gen_length} response tokens in "
                       f"data.seq_len={self.seq_len} (or set data.bad_records=skip)")
    return ids, fields

  def prompts(self) -> tuple[list[list[int]], list[dict]]:
    recs = self.batches.next_records()
    return [list(ids) for ids, _ in recs], [dict(f) for _, f in recs]

  def get_state(self) -> dict:
    return self.batches.get_state()

  def set_state(self, state: dict) -> None:
    self.batches.set_state(state)
