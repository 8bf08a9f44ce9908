"""Checkpoint locations: a local directory, or a Hugging Face hub id such as
`inclusionAI/LLaDA2.1-mini` (as vLLM and SGLang accept).

A hub id is downloaded on first use into the Hugging Face cache (`HF_HUB_CACHE`, default
`~/.cache/huggingface/hub`) and read from there afterwards; with `HF_HUB_OFFLINE=1` only the
cache is consulted. `huggingface_hub` reads both variables when it is first imported, which
happens here on the first hub look-up.
"""

from __future__ import annotations

import os
import re

# What a checkpoint needs: config + weights (+ index), tokenizer files, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]

# `owner/name`: the hub's repo id rules (letters, digits, `-`, `_`, `.`; 96 characters at most,
# neither part starting or ending with `-` or `.`, no `--` or `..`).
_MAX_REASON = 300
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")


def is_hub_id(s: str) -> bool:
  """Whether `s` has the form of a Hugging Face hub repo id `owner/name`."""
  return (len(s) <= 96 and _HUB_ID.fullmatch(s) is not None
          and "--" not in s and ".." not in s)


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
  """A local checkpoint directory for `path_or_id`.

  An existing directory is returned unchanged. Otherwise a string of the form `owner/name` is
  taken as a Hugging Face hub id and resolved with `huggingface_hub.snapshot_download` (only
  `HUB_PATTERNS`: configs, safetensors, tokenizer files, chat templates): downloaded on first
  use, then served from the local cache; `HF_HUB_OFFLINE=1` uses the cache only. Anything else,
  or a hub id that cannot be resolved, raises a one-line `ValueError` starting
  "no such checkpoint directory: ...".
  """
  s = os.fspath(path_or_id)
  if os.path.isdir(s):
    return s
  if not is_hub_id(s):
    raise ValueError(f"no such checkpoint directory: {s}")
  try:
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (slow import, rarely needed)
  except ImportError:
    raise ValueError(f"no such checkpoint directory: {s} (and huggingface_hub, needed to load it "
                     "as a Hugging Face hub id, is not installed)") from None
  try:
    return snapshot_download(s, allow_patterns=HUB_PATTERNS)
  except Exception as e:  # noqa: BLE001 (any hub failure becomes one clear line)
    reason = " ".join(str(e).split())[:_MAX_REASON] or "no details"
    raise ValueError(f"no such checkpoint directory: {s} (as a Hugging Face hub id: "
                     f"{type(e).__name__}: {reason})") from None
