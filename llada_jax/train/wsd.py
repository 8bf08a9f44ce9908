"""The WSD block-size schedule that converts an AR model into a block-diffusion model (SPEC 5.1).

Warmup grows the block 1 -> 4 -> 32 -> 64 -> whole sequence (MDLM), Stable trains at the whole
sequence, Decay shrinks it back to the target block. A schedule is a tuple of `(steps,
block_length)` stages; `block_length_at(step)` gives the stage's block (the train step is compiled
once per distinct block length).
"""

from __future__ import annotations

from typing import Sequence


def wsd_stages(seq_len: int, *, warmup=(1, 4, 32, 64), warmup_steps: int, stable_steps: int,
               decay=(2048, 512, 128, 32), decay_steps: int, target: int = 32):
  """The paper's schedule for a sequence length: warmup blocks (those < seq_len that divide it),
  then the whole sequence, then decay blocks down to `target`."""
  def ok(b):
    return b < seq_len and seq_len % b == 0
  stages = [(warmup_steps, b) for b in warmup if ok(b)]
  stages.append((stable_steps, seq_len))
  down = [b for b in decay if ok(b) and b > target] + [target]
  stages += [(decay_steps, b) for b in down if ok(b) or b == seq_len]
  return tuple(stages)


def validate(stages: Sequence[tuple[int, int]], seq_len: int) -> None:
  if not stages:
    raise ValueError("invalid WSD schedule: no stages")
  for steps, block in stages:
    if steps < 0 or block < 1:
      raise ValueError(f"invalid WSD stage ({steps}, {block})")
    if block < seq_len and seq_len % block:
      raise ValueError(f"invalid WSD stage: block {block} does not divide the sequence length "
                       f"{seq_len}")


def total_steps(stages) -> int:
  return sum(s for s, _ in stages)


def block_length_at(stages, step: int) -> int:
  """Block length at a 0-based step (the last stage continues past the end)."""
  for steps, block in stages:
    if step < steps:
      return block
    step -= steps
  return stages[-1][1]
