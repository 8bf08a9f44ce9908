"""Preference pairs for ELBO-DPO from JSONL files: `{"prompt", "chosen", "rejected"}` records.

Formats (one JSON object per line; the common conventions of preference datasets):
  * plain text: `"prompt"`, `"chosen"`, `"rejected"` strings; the prompt is tokenised as it is;
  * conversational: `"prompt"` a list of chat messages (rendered with the tokenizer's chat
    template and the assistant prompt; their contents joined by newlines without a template), `"chosen"` / `"rejected"` strings or lists of assistant
    messages (their contents joined);
  * implicit prompt: no `"prompt"`; `"chosen"` and `"rejected"` whole conversations sharing
    every message but the last, which is the answer.
Each answer gets the EOS id appended. A bad record is one `InputError` naming the file, the line
and the field, raised when the file is read (before training starts).

`PairSource` draws batch i as elements [i*B, (i+1)*B) of a grain `MapDataset` over the records,
shuffled with the run's seed and repeated epoch after epoch (each epoch reshuffled): batch i
depends only on (seed, i), so the state is the batch index and resuming is exact. Every process
draws the whole global batch (as toy tasks do); the trainer keeps its rows.
"""

from __future__ import annotations

import os
from typing import Any

from llada_jax.errors import InputError


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
    return chosen[:-1], _text_of(chosen[-1:], where, "chosen"), _text_of(rejected[-1:], where,
                                                                         "rejected")
  if not (isinstance(prompt, str) or _is_messages(prompt)):
    raise InputError(f"{where}: prompt must be a string or a list of chat messages")
  if isinstance(prompt, str) and not prompt:
    raise InputError(f"{where}: empty prompt")
  return prompt, _text_of(chosen, where, "chosen"), _text_of(rejected, where, "rejected")


def read_pairs(path: str) -> list[tuple[Any, str, str]]:
  """Every record of a JSONL file (or of every `*.jsonl` file of a directory, in name order)."""
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".jsonl")]
           if os.path.isdir(path) else [path])
  if not files:
    raise InputError(f"no .jsonl files in {path}")
  from llada_jax.train.data import jsonl_objects  # noqa: PLC0415
  out = [parse_record(obj, where) for file in files for _, where, obj in jsonl_objects(file)]
  if not out:
    raise InputError(f"{path} holds no preference records")
  return out


class PairSource:
  """(chosen, rejected) batches of `batch_size` pairs (see the module doc). Records are
  tokenised once, here; a pair whose prompt and longer answer (with EOS) do not fit `seq_len`
  is left out, with one warning line giving the count (none fitting is an `InputError`)."""

  def __init__(self, path: str, tokenizer, seq_len: int, batch_size: int, seed: int):
    import grain  # noqa: PLC0415
    self.tok, self.seq_len, self.batch_size, self.seed = tokenizer, seq_len, batch_size, seed
    pairs, long = [], 0
    for prompt, chosen, rejected in read_pairs(path):
      p = self._prompt_ids(prompt)
      c = self.tok.encode(chosen) + [self.tok.eos_id]
      r = self.tok.encode(rejected) + [self.tok.eos_id]
      if len(p) + max(len(c), len(r)) > seq_len:
        long += 1
        continue
      pairs.append((p, c, r))
    if not pairs:
      raise InputError(f"no preference pair of {path} fits data.seq_len={seq_len} (prompt + "
                       "answer + EOS)")
    if long:
      print(f"warning: {long} of {long + len(pairs)} preference pairs of {path} are longer "
            f"than data.seq_len={seq_len} and are left out", flush=True)
    self.size = len(pairs)
    self.dataset = grain.MapDataset.source(pairs).shuffle(seed=seed % 2**32).repeat()
    self.index = 0

  def _prompt_ids(self, prompt) -> list[int]:
    """Text as it is; messages through the chat template (raw contents without one), as SFT
    prompts are rendered (`llada_jax.train.data.render_prompt`)."""
    from llada_jax.train.data import render_prompt  # noqa: PLC0415
    return self.tok.encode(prompt if isinstance(prompt, str) else render_prompt(self.tok, prompt))

  def next_pair(self) -> tuple[dict, dict]:
    from llada_jax.train.ebpo import build_batch  # noqa: PLC0415
    lo = self.index * self.batch_size
    recs = [self.dataset[lo + k] for k in range(self.batch_size)]
    self.index += 1
    prompts = [p for p, _, _ in recs]
    return (build_batch(prompts, [c for _, c, _ in recs], self.seq_len, self.tok.pad_id),
            build_batch(prompts, [r for _, _, r in recs], self.seq_len, self.tok.pad_id))

  def get_state(self) -> dict:
    return {"index": self.index, "pairs": self.size, "batch_size": self.batch_size,
            "seed": self.seed}

  def set_state(self, state: dict) -> None:
    for key, mine in (("pairs", self.size), ("batch_size", self.batch_size),
                      ("seed", self.seed)):
      if key in state and int(state[key]) != mine:
        raise InputError(f"the checkpoint's preference data had {key}={state[key]}, this run "
                         f"has {mine}: resuming would not continue the same batches (use a new "
                         "workdir)")
    self.index = int(state["index"])
