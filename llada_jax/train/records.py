"""Post-training records from JSONL files, batched by index (preference pairs, prompt sets).

`read_records` parses every record of a JSONL file (or of every `*.jsonl` file of a directory,
in name order) with a per-record parser. A bad record (invalid JSON, a missing or mistyped field,
an empty answer, a prompt longer than the context) is one `InputError` naming the file and the
line (`bad_records="error"`, the default), or is left out and counted (`"skip"`: the count is
printed once and logged in the metrics as `data_skipped`).

`IndexedBatches` draws batch i as elements [i*B, (i+1)*B) of a grain `MapDataset` over the parsed
records, shuffled with the run's seed and repeated epoch after epoch (each epoch reshuffled):
batch i depends only on (seed, i), so the state is the batch index and resuming is exact. Every
process draws the whole global batch (as toy tasks do); the trainer keeps its rows.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from llada_jax.errors import InputError

BAD_RECORDS = ("error", "skip")


def jsonl_files(path: str) -> list[str]:
  """`path` itself, or the `*.jsonl` files of the directory `path` in name order."""
  if not os.path.isdir(path):
    return [path]
  files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".jsonl")]
  if not files:
    raise InputError(f"no .jsonl files in {path}")
  return files


def read_records(path: str, parse: Callable[[Any, str], Any], *, what: str,
                 bad_records: str = "error") -> tuple[list, int]:
  """(`parse(obj, "file:line")` of every record, the number of bad records left out).

  `parse` raises `InputError` for a bad record (and may return None to drop a record silently).
  `what` names the records in messages ("preference pairs")."""
  if bad_records not in BAD_RECORDS:
    raise InputError(f"data.bad_records {bad_records!r} (choose from {', '.join(BAD_RECORDS)})")
  out, skipped = [], 0
  for file in jsonl_files(path):
    with open(file, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{file}:{lineno}"
        try:
          try:
            obj = json.loads(line)
          except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg})") from None
          rec = parse(obj, where)
        except InputError:
          if bad_records == "error":
            raise
          skipped += 1
          continue
        if rec is not None:
          out.append(rec)
  if not out:
    why = f" ({skipped} bad records left out)" if skipped else ""
    raise InputError(f"{path} holds no usable {what}{why}")
  if skipped:
    print(f"warning: {skipped} bad records of {path} are left out (data.bad_records=skip)",
          flush=True)
  return out, skipped


class IndexedBatches:
  """Batches of `batch_size` records; batch i depends only on (seed, i) (module doc)."""

  def __init__(self, records: list, batch_size: int, seed: int, *, what: str):
    import grain  # noqa: PLC0415
    self.size, self.batch_size, self.seed, self.what = len(records), batch_size, seed, what
    self.dataset = grain.MapDataset.source(records).shuffle(seed=seed % 2**32).repeat()
    self.index = 0

  def next_records(self) -> list:
    lo = self.index * self.batch_size
    self.index += 1
    return [self.dataset[lo + k] for k in range(self.batch_size)]

  def get_state(self) -> dict:
    return {"index": self.index, "records": self.size, "batch_size": self.batch_size,
            "seed": self.seed}

  def set_state(self, state: dict) -> None:
    size_key = "records" if "records" in state else "pairs"  # checkpoints before prompt sets
    for key, mine in ((size_key, self.size), ("batch_size", self.batch_size),
                      ("seed", self.seed)):
      if key in state and int(state[key]) != mine:
        raise InputError(f"the checkpoint's {self.what} had {key}={state[key]}, this run has "
                         f"{mine}: resuming would not continue the same batches (use a new "
                         "workdir)")
    self.index = int(state["index"])
