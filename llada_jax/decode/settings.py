"""`DecodeSettings`: every knob of block-diffusion decoding, the Quality/Speedy presets, checks."""

from __future__ import annotations

import dataclasses
from typing import Any

ALGORITHMS = ("llada2.1", "llada2.0")

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
  threshold: float = 0.7  # tau_mask: M2T fills masks whose confidence is > threshold
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

  @classmethod
  def for_mode(cls, mode: str = "quality", **overrides) -> "DecodeSettings":
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"unknown decode setting(s): {', '.join(unknown)}")
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
    """Raises one `ValueError` naming the first bad setting."""
    def bad(msg):
      raise ValueError(f"invalid decode setting: {msg}")
    if self.algorithm not in ALGORITHMS:
      bad(f"algorithm {self.algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    for name in ("gen_length", "block_length", "steps", "num_to_transfer", "mbe_window"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        bad(f"{name} must be a positive integer, got {v!r}")
    for name in ("max_post_steps", "top_k"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        bad(f"{name} must be a non-negative integer, got {v!r}")
    if self.temperature < 0:
      bad(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      bad(f"top_p must be in (0, 1], got {self.top_p}")
    for name in ("threshold", "editing_threshold"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool):
        bad(f"{name} must be a number, got {v!r}")
    if vocab_size is not None:
      for name in ("eos_id", "mask_id"):
        v = getattr(self, name)
        if not 0 <= v < vocab_size:
          bad(f"{name} {v} is not a token id of a vocabulary of {vocab_size}")
      if self.eos_id == self.mask_id:
        bad("eos_id and mask_id must differ")
