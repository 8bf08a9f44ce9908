"""`DecodeSettings`: every knob of block-diffusion decoding, the Quality/Speedy presets, checks."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from llada_jax.errors import InputError, describe_value

ALGORITHMS = ("llada2.1", "llada2.0")

# Thresholds are probabilities in [0, 1]; 1 means "never" (no probability exceeds it). Values up
# to 1.01, the reference code's way of switching editing off, are accepted and mean never too.
THRESHOLD_NEVER = 1.01

# SPEC 7: our mode presets (LLaDA2.1 joint threshold decoding).
MODES: dict[str, dict[str, Any]] = {
    "quality": dict(threshold=0.7, editing_threshold=0.5, max_post_steps=16),
    "speedy": dict(threshold=0.5, editing_threshold=0.0, max_post_steps=16),
}


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Decoding settings. Token ids of -1 mean "take it from the model config"."""

  algorithm: str = "llada2.1"
  gen_length: int = 256
  block_length: int = 32
  threshold: float = 0.7  # tau_mask: M2T fills masks whose confidence is > this (in [0, 1])
  editing_threshold: float = 0.5  # tau_edit: T2T replaces tokens whose new prob is > this
  max_post_steps: int = 16  # LLaDA2.1: extra editing forwards per block once it has no mask
  num_to_transfer: int = 1  # LLaDA2.1: at least this many masks filled per forward
  steps: int = 32  # LLaDA2.0: denoising steps per block (sets the per-step count schedule)
  temperature: float = 0.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  seed: int = 0
  eos_id: int = -1
  mask_id: int = -1
  eos_early_stop: bool = True
  mbe_window: int = 1  # multi-block editing: blocks kept editable (1 = the reference algorithm)
  # The loop's iteration budget (each iteration is one forward or a block advance). 0: the
  # default, blocks * (block forwards + max_post_steps + 2) + 2, which every row reaches only
  # when its model keeps writing the mask id back. A row stopped by it has finish status
  # "budget" (see `GenerateResult.finish`).
  max_iterations: int = 0

  @classmethod
  def for_mode(cls, mode: str = "quality", **overrides) -> "DecodeSettings":
    if mode not in MODES:
      raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise InputError(f"unknown decode setting(s): {', '.join(unknown)}")
    kw = dict(MODES[mode], block_length=32, temperature=0.0, eos_early_stop=True,
              num_to_transfer=1)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    s = cls(**kw)
    s.validate()
    return s

  def with_ids(self, eos_id: int, mask_id: int) -> "DecodeSettings":
    """Fills eos/mask ids left at -1 from the model config."""
    return dataclasses.replace(self, eos_id=eos_id if self.eos_id < 0 else self.eos_id,
                               mask_id=mask_id if self.mask_id < 0 else self.mask_id)

  def validate(self, vocab_size: int | None = None) -> None:
    """Raises one `InputError` (a `ValueError`) naming the first bad setting, its value and
    what is allowed. With `vocab_size`: also the token ids and `top_k` against the vocabulary."""
    def bad(msg):
      raise InputError(f"invalid decode setting: {msg}")
    def got(v):
      return describe_value(v)
    if not isinstance(self.algorithm, str) or self.algorithm not in ALGORITHMS:
      bad(f"algorithm {self.algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    for name in ("gen_length", "block_length", "steps", "num_to_transfer", "mbe_window"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        bad(f"{name} must be a positive integer, got {got(v)}")
    for name in ("max_post_steps", "top_k", "max_iterations"):
      v = getattr(self, name)
      if not _is_int(v) or v < 0:
        bad(f"{name} must be a non-negative integer (0 = {_ZERO_MEANS[name]}), got {got(v)}")
    if self.num_to_transfer > self.block_length:
      bad(f"num_to_transfer ({self.num_to_transfer}) must be at most block_length "
          f"({self.block_length}): it is the number of masks filled per forward within a block")
    for name in ("threshold", "editing_threshold"):
      v = getattr(self, name)
      if not _is_number(v) or not 0.0 <= v <= THRESHOLD_NEVER:  # NaN fails this test too
        hint = ""
        if _is_number(v) and 2.0 <= v <= 100.0:
          hint = f"; {v:g} looks like a percentage, use {v / 100:g}"
        bad(f"{name} {got(v)} is not a probability: thresholds are probabilities in [0, 1] "
            f"(1 = never){hint}")
    if not _is_number(self.temperature) or not 0.0 <= self.temperature < math.inf:
      bad(f"temperature must be a finite number >= 0 (0 = greedy), got {got(self.temperature)}")
    if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
      bad(f"top_p must be in (0, 1] (1 = off), got {got(self.top_p)}")
    if not _is_int(self.seed) or not -2**63 <= self.seed < 2**63:
      bad(f"seed must be a 64-bit integer, got {got(self.seed)}")
    for name in ("gen_length", "block_length", "steps", "num_to_transfer", "mbe_window",
                 "max_post_steps", "top_k", "max_iterations"):
      if getattr(self, name) >= 2**31:
        bad(f"{name} must be below 2**31, got {getattr(self, name)}")
    if not isinstance(self.eos_early_stop, bool):
      bad(f"eos_early_stop must be true or false, got {got(self.eos_early_stop)}")
    for name in ("eos_id", "mask_id"):
      v = getattr(self, name)
      if not _is_int(v) or v < -1:
        bad(f"{name} must be a token id (or -1: from the model config), got {got(v)}")
    if vocab_size is not None:
      for name in ("eos_id", "mask_id"):
        v = getattr(self, name)
        if not 0 <= v < vocab_size:
          bad(f"{name} {v} is not a token id of a vocabulary of {vocab_size}")
      if self.eos_id == self.mask_id:
        bad("eos_id and mask_id must differ")
      if self.top_k > vocab_size:
        bad(f"top_k ({self.top_k}) exceeds the vocabulary size ({vocab_size}); use a smaller "
            "value, or 0 for no top-k filtering")


_ZERO_MEANS = {"max_post_steps": "no editing forwards after a block has no mask",
               "max_iterations": "the default budget",
               "top_k": "off"}


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)
