"""Generated tasks with exactly checkable answers whose tokens depend on each other.

Each task maps a `random.Random` to a `(prompt, answer)` pair of strings. Used for SFT/DPO/EBPO
smoke runs and the speed/quality benchmark (`experiments/`).

Benchmark variants (`experiments/paper_in_miniature.py`): `bench_add2` (2-digit addition),
`bench_rev` (reversal of 3-6 letters), `bench_sort` (sorting 3-6 digits), `bench_pick` (copy
either of two words of one repeated letter: two valid answers, so positions decoded in
parallel can mix them) and `bench_mix` (one of the four at random).
Any task name may carry a split suffix, `NAME@train` or `NAME@test`: the split of an example is
a fixed hash of its prompt (`in_test_split`), so the two splits never share a prompt whatever
seeds draw them (`get_task` rejection-samples the wanted split).
"""

from __future__ import annotations

import functools
import hashlib
import random
from typing import Callable

Example = tuple[str, str]


def addition(rng: random.Random, digits: int = 3) -> Example:
  a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
  return f"{a}+{b}=", str(a + b)


def _length(rng: random.Random, length: int, min_length: int | None) -> int:
  return length if min_length is None else rng.randint(min_length, length)


def reverse(rng: random.Random, length: int = 6, min_length: int | None = None) -> Example:
  s = "".join(rng.choice("abcdefghij") for _ in range(_length(rng, length, min_length)))
  return f"rev {s}=", s[::-1]


def sort_digits(rng: random.Random, length: int = 6, min_length: int | None = None) -> Example:
  s = "".join(rng.choice("0123456789") for _ in range(_length(rng, length, min_length)))
  return f"sort {s}=", "".join(sorted(s))


def pick_one(rng: random.Random, length: int = 6, min_length: int = 4) -> Example:
  """`pick cccc ffff=` -> `cccc` or `ffff` (each w.p. 1/2; both are right answers).

  Each answer token alone is a coin flip between the two letters, but the tokens must agree: a
  decoder that fills several positions at once from their marginals mixes them (`cfcf`), one
  that fills a token at a time, or edits, can stay consistent.
  """
  n = _length(rng, length, min_length)
  x, y = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
  return f"pick {x * n} {y * n}=", rng.choice((x, y)) * n


def pick_options(prompt: str) -> list[str]:
  """The two valid answers of a `pick_one` prompt."""
  return prompt[len("pick "):-1].split(" ")


def repeat_char(rng: random.Random, length: int = 8) -> Example:
  c = rng.choice("xyz")
  return f"rep {c}=", c * length


# The miniature speed/quality benchmark: short answers (<= 6 tokens + EOS), prompt + answer
# within 26 tokens, variable answer lengths (the model must also place the EOS).
BENCHMARK: dict[str, Callable[[random.Random], Example]] = {
    "bench_add2": functools.partial(addition, digits=2),
    "bench_rev": functools.partial(reverse, length=6, min_length=3),
    "bench_sort": functools.partial(sort_digits, length=6, min_length=3),
    "bench_pick": pick_one,
}


def mixed(rng: random.Random) -> Example:
  """One benchmark task at random (uniformly), then an example of it."""
  return BENCHMARK[rng.choice(sorted(BENCHMARK))](rng)


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "addition": addition, "reverse": reverse, "sort": sort_digits, "repeat": repeat_char,
    "pick": pick_one,
    **BENCHMARK, "bench_mix": mixed,
}
SPLITS = ("train", "test")
TEST_FRACTION = 0.1


def in_test_split(prompt: str, test_fraction: float = TEST_FRACTION) -> bool:
  """Whether `prompt` belongs to the test split: a fixed hash of the prompt text (stable across
  runs, Python versions and seeds), so train and test never share a prompt."""
  h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
  return h % 1_000_000 < test_fraction * 1_000_000


def split_task(fn: Callable[[random.Random], Example], split: str,
               test_fraction: float = TEST_FRACTION) -> Callable[[random.Random], Example]:
  """`fn` restricted to one split (rejection sampling on `in_test_split`)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
  want = split == "test"

  def draw(rng: random.Random) -> Example:
    for _ in range(100_000):
      ex = fn(rng)
      if in_test_split(ex[0], test_fraction) == want:
        return ex
    raise RuntimeError(f"no {split} example found in 100000 draws")
  return draw


def get_task(name: str) -> Callable[[random.Random], Example]:
  """A task by name; `NAME@train` / `NAME@test` restrict it to one split."""
  base, _, split = name.partition("@")
  if base not in TASKS:
    raise ValueError(f"unknown task {base!r}; choose from {', '.join(sorted(TASKS))}")
  if split:
    return split_task(TASKS[base], split)
  return TASKS[base]


def task_of(prompt: str) -> str:
  """Which benchmark task a prompt belongs to, as a short label (`add2`, `rev`, `sort`, `pick`)."""
  if prompt.startswith("pick "):
    return "pick"
  if prompt.startswith("rev "):
    return "rev"
  if prompt.startswith("sort "):
    return "sort"
  return "add2"


def examples(name: str, n: int, seed: int) -> list[Example]:
  rng = random.Random(seed)
  fn = get_task(name)
  return [fn(rng) for _ in range(n)]


def unique_examples(name: str, n: int, seed: int) -> list[Example]:
  """`n` examples with distinct prompts (in draw order), e.g. a test set:
  `unique_examples("bench_add2@test", 128, seed)`."""
  rng = random.Random(seed)
  fn = get_task(name)
  out, seen = [], set()
  for _ in range(1000 * n):
    if len(out) == n:
      break
    p, a = fn(rng)
    if p not in seen:
      seen.add(p)
      out.append((p, a))
  if len(out) < n:
    raise ValueError(f"task {name!r} has fewer than {n} distinct prompts")
  return out


def exact_match(predicted: str, answer: str) -> float:
  return float(predicted.strip() == answer)


def match_any(predicted: str, answers: str) -> float:
  """1.0 when the prediction is one of the `|`-separated valid answers (exact match otherwise)."""
  return float(predicted.strip() in answers.split("|"))


def char_overlap(predicted: str, answer: str) -> float:
  """Fraction of answer characters reproduced at the same place (a dense reward)."""
  if not answer:
    return 0.0
  return sum(a == b for a, b in zip(predicted, answer)) / len(answer)
