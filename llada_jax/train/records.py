"""Post-training records from JSONL files or tfds datasets, batched by index (preference pairs,
prompt sets).

`read_records` parses every record of a JSONL file (or of every `*.jsonl` file of a directory,
in name order), or of the `train` split of a prepared tensorflow-datasets dataset (an
array_record directory with `dataset_info.json`, read without TF as `llada_jax.train.data`
reads corpora), with a per-record parser. tfds features arrive as plain Python values: text as
`str`, a `Sequence` of dicts (e.g. chat `messages` with `role` / `content`) as a list of dicts;
an empty string or list is a field the record leaves out (tfds stores every feature).
A bad record (invalid JSON, a missing or mistyped field, an empty answer, a prompt longer than
the context) is one `InputError` naming the file and the line (or the dataset, split and
index: `DIR[train]#17`) (`bad_records="error"`, the default), or is left out and counted
(`"skip"`: the count is printed once and logged in the metrics as `data_skipped`).

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
    raise InputError(f"no .jsonl files (and no prepared tfds dataset) in {path}")
  return files


def tfds_dataset_dir(path: str) -> str | None:
  """The versioned directory of the prepared tfds dataset at `path` (that directory, a
  `<data_dir>/<name>` or a `<data_dir>` holding one dataset), or None when `path` is not one."""
  from llada_jax.train.data import _resolve_dataset_dir  # noqa: PLC0415
  if not os.path.isdir(path):
    return None
  try:
    return _resolve_dataset_dir(path)
  except FileNotFoundError:
    return None
  except ValueError as e:  # several datasets: say which to pass
    raise InputError(str(e)) from None


def plain(value: Any) -> Any:
  """A decoded tfds feature as plain Python: bytes -> str, numpy scalars -> numbers, arrays ->
  lists, a `Sequence` of dicts (decoded as a dict of equal-length lists) -> a list of dicts."""
  import numpy as np  # noqa: PLC0415
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.generic):
    return plain(value.item())
  if isinstance(value, np.ndarray):
    return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, dict):
    out = {k: plain(v) for k, v in value.items()}
    columns = list(out.values())
    if columns and all(isinstance(v, list) for v in columns) and len(
        {len(v) for v in columns}) == 1:
      return [dict(zip(out, row)) for row in zip(*columns)]
    return out
  return value


def _records(path: str):
  """(where, raw JSON line or decoded object) of every record of `path`."""
  ds_dir = tfds_dataset_dir(path)
  if ds_dir is not None:
    from llada_jax.train.data import load_source  # noqa: PLC0415
    try:
      source, _ = load_source(ds_dir, "train")
    except ValueError as e:  # no train split
      raise InputError(str(e)) from None
    for i in range(len(source)):
      # A tfds record holds every feature: an empty string or list stands for a field the
      # record leaves out (e.g. no "prompt" where the conversation is in "messages").
      rec = {k: plain(v) for k, v in source[i].items()}
      yield f"{ds_dir}[train]#{i}", {k: v for k, v in rec.items() if v not in ("", [])}
    return
  for file in jsonl_files(path):
    with open(file, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, 1):
        if line.strip():
          yield f"{file}:{lineno}", line


def read_records(path: str, parse: Callable[[Any, str], Any], *, what: str,
                 bad_records: str = "error") -> tuple[list, int]:
  """(`parse(obj, "file:line")` of every record, the number of bad records left out).

  `parse` raises `InputError` for a bad record (and may return None to drop a record silently).
  `what` names the records in messages ("preference pairs"). `path`: JSONL or a tfds dataset
  (module doc)."""
  if bad_records not in BAD_RECORDS:
    raise InputError(f"data.bad_records {bad_records!r} (choose from {', '.join(BAD_RECORDS)})")
  out, skipped = [], 0
  for where, raw in _records(path):
    try:
      if isinstance(raw, str):
        try:
          raw = json.loads(raw)
        except json.JSONDecodeError as e:
          raise InputError(f"{where}: invalid JSON ({e.msg})") from None
      rec = parse(raw, where)
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
