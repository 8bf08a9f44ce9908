"""Generated tasks with exactly checkable answers whose tokens depend on each other.

Each task maps a `random.Random` to a `(prompt, answer)` pair of strings. Used for SFT/DPO/EBPO
smoke runs and the speed/quality benchmark (`experiments/`).
"""

from __future__ import annotations

import random
from typing import Callable

Example = tuple[str, str]


def addition(rng: random.Random, digits: int = 3) -> Example:
  a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
  return f"{a}+{b}=", str(a + b)


def reverse(rng: random.Random, length: int = 6) -> Example:
  s = "".join(rng.choice("abcdefghij") for _ in range(length))
  return f"rev {s}=", s[::-1]


def sort_digits(rng: random.Random, length: int = 6) -> Example:
  s = "".join(rng.choice("0123456789") for _ in range(length))
  return f"sort {s}=", "".join(sorted(s))


def repeat_char(rng: random.Random, length: int = 8) -> Example:
  c = rng.choice("xyz")
  return f"rep {c}=", c * length


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "addition": addition, "reverse": reverse, "sort": sort_digits, "repeat": repeat_char,
}


def get_task(name: str) -> Callable[[random.Random], Example]:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
  return TASKS[name]


def examples(name: str, n: int, seed: int) -> list[Example]:
  rng = random.Random(seed)
  fn = get_task(name)
  return [fn(rng) for _ in range(n)]


def exact_match(predicted: str, answer: str) -> float:
  return float(predicted.strip() == answer)


def char_overlap(predicted: str, answer: str) -> float:
  """Fraction of answer characters reproduced at the same place (a dense reward)."""
  if not answer:
    return 0.0
  return sum(a == b for a, b in zip(predicted, answer)) / len(answer)
