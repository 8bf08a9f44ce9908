"""A generated corpus of everyday Python: classes, documented functions, small algorithms.

  python experiments/python_idioms.py OUT_DIR --docs 20000 [--seed 0] [--split train|held_out]

Each document is a small module (imports, then two to four units separated by two blank lines)
built from templates of the idioms real code repeats: a class storing its constructor arguments
with `__repr__` and a property, a function with a Google-style docstring around a filter / count /
sum / lookup / file loop, a catalogue of small algorithms (fibonacci, gcd, binary search, ...),
and `main()` with its `__name__` guard. Names are drawn from word lists; the words of `HELD_OUT`
never appear in the generated training split (the standard-library corpus the model also reads
may use some of them as ordinary words), and held-out documents (split `held_out`) have no
algorithm units, so their code names things in ways the generated training modules never do and
only the structure is shared. This is the low-entropy code a 2-core CPU can
learn to high confidence, which is what lets block diffusion fill several tokens per forward.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil

NOUNS = (
    "user account order item record entry node edge task job event message packet frame token "
    "file path line word name label key value score point vector matrix image pixel color shape "
    "book author page chapter note comment post tag group team player game move card deck "
    "customer product price invoice payment cart address city country region server client "
    "request response session cookie header query result report metric sample batch chunk "
    "block buffer stream queue stack cache table column row cell field schema model layer "
    "config option setting rule policy handler callback worker thread process signal timer "
    "device sensor reading station route trip vehicle driver ticket seat flight hotel room"
).split()
# Identifiers that appear only in held-out documents (never in the training split).
HELD_OUT = ("planet orbit recipe ingredient garden flower animal habitat song album "
            "course student grade lesson molecule atom river bridge").split()
VERBS = ("load save parse format find count filter collect build merge split update remove "
         "validate normalize compute render process fetch send read write check").split()
ADJ = "active valid empty visible open closed public hidden enabled ready".split()
ATTRS = "id name size count total weight level status kind owner created".split()
IMPORTS = ("import os", "import sys", "import json", "import re", "import math",
           "import logging", "from collections import defaultdict",
           "from dataclasses import dataclass", "from typing import List, Optional")


def _camel(*words: str) -> str:
  return "".join(w.capitalize() for w in words)


def _plural(w: str) -> str:
  if w.endswith(("s", "x", "ch", "sh")):
    return w + "es"
  if w.endswith("y") and w[-2] not in "aeiou":
    return w[:-1] + "ies"
  return w + "s"


def unit_class(r: random.Random, nouns) -> str:
  noun = r.choice(nouns)
  fields = r.sample(ATTRS, r.randint(2, 4))
  name = _camel(noun) if r.random() < 0.6 else _camel(r.choice(nouns), noun)
  args = ", ".join(fields)
  body = [f"class {name}:", f'    """A {noun} with its {", ".join(fields[:-1])} and {fields[-1]}."""',
          "", f"    def __init__(self, {args}):"]
  body += [f"        self.{f} = {f}" for f in fields]
  body += ["", "    def __repr__(self):",
           f'        return f"{name}(' + ", ".join(f"{f}={{self.{f}!r}}" for f in fields) + ')"']
  if r.random() < 0.6:
    f = r.choice(fields)
    body += ["", "    @property", f"    def has_{f}(self):",
             f'        """Whether the {noun} has a {f}."""', f"        return self.{f} is not None"]
  if r.random() < 0.5:
    body += ["", "    def to_dict(self):", f'        """The {noun} as a dictionary."""',
             "        return {"] + [f'            "{f}": self.{f},' for f in fields] + ["        }"]
  if r.random() < 0.4:
    body += ["", "    def __eq__(self, other):", f"        if not isinstance(other, {name}):",
             "            return NotImplemented",
             "        return " + " and ".join(f"self.{f} == other.{f}" for f in fields)]
  return "\n".join(body)


def unit_function(r: random.Random, nouns) -> str:
  noun, verb = r.choice(nouns), r.choice(VERBS)
  many, attr, adj = _plural(noun), r.choice(ATTRS), r.choice(ADJ)
  kind = r.randrange(6)
  if kind == 0:
    name, sig = f"{verb}_{adj}_{many}", f"{many}"
    doc, ret = f"Return the {adj} {many}.", f"A list of the {adj} {many}."
    code = ["    result = []", f"    for {noun} in {many}:", f"        if {noun}.{adj}:",
            f"            result.append({noun})", "    return result"]
  elif kind == 1:
    name, sig = f"count_{many}_by_{attr}", f"{many}"
    doc, ret = f"Count the {many} by {attr}.", f"A dictionary from each {attr} to its count."
    code = ["    counts = defaultdict(int)", f"    for {noun} in {many}:",
            f"        counts[{noun}.{attr}] += 1", "    return dict(counts)"]
  elif kind == 2:
    name, sig = f"total_{attr}", f"{many}"
    doc, ret = f"Add up the {attr} of all {many}.", f"The total {attr}."
    code = ["    total = 0", f"    for {noun} in {many}:", f"        total += {noun}.{attr}",
            "    return total"]
  elif kind == 3:
    name, sig = f"find_{noun}", f"{many}, {attr}"
    doc, ret = f"Find the {noun} with the given {attr}.", f"The {noun}, or None if there is none."
    code = [f"    for {noun} in {many}:", f"        if {noun}.{attr} == {attr}:",
            f"            return {noun}", "    return None"]
  elif kind == 4:
    name, sig = f"{verb}_{many}", "path"
    doc, ret = f"Read the {many} from a file.", f"A list of {many}, one per line."
    code = [f"    {many} = []", "    with open(path) as f:", "        for line in f:",
            "            line = line.strip()", "            if line:",
            f"                {many}.append(line)", f"    return {many}"]
  else:
    name, sig = f"{verb}_{noun}", f"{noun}"
    doc, ret = f"{verb.capitalize()} a {noun}.", f"The {noun}, or None if it is not valid."
    code = ["    try:", f"        value = int({noun})", "    except (TypeError, ValueError):",
            f'        logging.warning("invalid {noun}: %r", {noun})', "        return None",
            "    return value"]
  args = [a.strip() for a in sig.split(",")]
  lines = [f"def {name}({sig}):", f'    """{doc}', "", "    Args:"]
  lines += [f"        {a}: The {a.replace('_', ' ')}." for a in args]
  lines += ["", "    Returns:", f"        {ret}", '    """']
  return "\n".join(lines + code)


ALGORITHMS = {
    "fibonacci": ("n", "Return the n-th Fibonacci number.",
                  ["    a, b = 0, 1", "    for _ in range(n):", "        a, b = b, a + b",
                   "    return a"]),
    "factorial": ("n", "Return n factorial.",
                  ["    result = 1", "    for i in range(2, n + 1):", "        result *= i",
                   "    return result"]),
    "gcd": ("a, b", "Return the greatest common divisor of a and b.",
            ["    while b:", "        a, b = b, a % b", "    return a"]),
    "is_prime": ("n", "Return whether n is a prime number.",
                 ["    if n < 2:", "        return False", "    for i in range(2, int(n ** 0.5) + 1):",
                  "        if n % i == 0:", "            return False", "    return True"]),
    "binary_search": ("items, target", "Return the index of target in the sorted items, or -1.",
                      ["    lo, hi = 0, len(items) - 1", "    while lo <= hi:",
                       "        mid = (lo + hi) // 2", "        if items[mid] == target:",
                       "            return mid", "        if items[mid] < target:",
                       "            lo = mid + 1", "        else:", "            hi = mid - 1",
                       "    return -1"]),
    "reverse": ("text", "Return the text reversed.", ["    return text[::-1]"]),
    "is_palindrome": ("text", "Return whether the text reads the same backwards.",
                      ["    text = text.lower()", "    return text == text[::-1]"]),
    "flatten": ("lists", "Return the items of the lists in one list.",
                ["    result = []", "    for items in lists:", "        result.extend(items)",
                 "    return result"]),
    "chunks": ("items, size", "Split the items into lists of at most size items.",
               ["    return [items[i:i + size] for i in range(0, len(items), size)]"]),
    "clamp": ("value, low, high", "Return value limited to the range [low, high].",
              ["    return max(low, min(value, high))"]),
    "mean": ("values", "Return the mean of the values.",
             ["    if not values:", "        raise ValueError(\"mean of an empty list\")",
              "    return sum(values) / len(values)"]),
    "unique": ("items", "Return the items without duplicates, in their first order.",
               ["    seen = set()", "    result = []", "    for item in items:",
                "        if item not in seen:", "            seen.add(item)",
                "            result.append(item)", "    return result"]),
    "word_count": ("text", "Count how often each word occurs in the text.",
                   ["    counts = {}", "    for word in text.split():",
                    "        counts[word] = counts.get(word, 0) + 1", "    return counts"]),
    "max_index": ("values", "Return the index of the largest value.",
                  ["    best = 0", "    for i in range(1, len(values)):",
                   "        if values[i] > values[best]:", "            best = i",
                   "    return best"]),
}


def unit_algorithm(r: random.Random, nouns) -> str:
  name = r.choice(sorted(ALGORITHMS))
  args, doc, code = ALGORITHMS[name]
  return "\n".join([f"def {name}({args}):", f'    """{doc}"""'] + code)


def unit_main(r: random.Random, nouns) -> str:
  noun, verb = r.choice(nouns), r.choice(VERBS)
  many = _plural(noun)
  return "\n".join([
      "def main():", f"    {many} = {verb}_{many}(sys.argv[1])", f"    for {noun} in {many}:",
      f"        print({noun})", "    return 0", "", "", 'if __name__ == "__main__":',
      "    sys.exit(main())"])


def document(r: random.Random, nouns, algorithms: bool = True) -> str:
  """One module; `algorithms=False` leaves out the catalogue of small algorithms (whose text
  does not depend on the nouns, so a held-out document must not contain them)."""
  imports = sorted(r.sample(IMPORTS, r.randint(1, 3)), key=lambda s: (s.startswith("from"), s))
  kinds = (unit_class, unit_function, unit_function) + ((unit_algorithm,) if algorithms else ())
  units = [r.choice(kinds)(r, nouns) for _ in range(r.randint(2, 4))]
  if r.random() < 0.25:
    units.append(unit_main(r, nouns))
  return "\n".join(imports) + "\n\n\n" + "\n\n\n".join(units) + "\n"


def documents(n: int, seed: int, split: str = "train") -> list[str]:
  """`n` generated modules; split "held_out" names things only with `HELD_OUT` words and has no
  algorithm units (their text is the same in every split)."""
  nouns = [w for w in NOUNS if w not in HELD_OUT] if split == "train" else list(HELD_OUT)
  r = random.Random(f"{split}:{seed}")
  return [document(r, nouns, algorithms=split == "train") for _ in range(n)]


def write_corpus(out: str, n: int, seed: int = 0, split: str = "train") -> str:
  """Writes `documents(n, seed, split)` as `out/idiom_NNNNNN.txt`, atomically."""
  if os.path.isdir(out):
    return out
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for i, text in enumerate(documents(n, seed, split)):
    with open(os.path.join(tmp, f"idiom_{i:06d}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  os.replace(tmp, out)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("out")
  p.add_argument("--docs", type=int, default=20000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--split", choices=("train", "held_out"), default="train")
  a = p.parse_args(argv)
  write_corpus(a.out, a.docs, a.seed, a.split)
  print(f"{a.docs} documents in {a.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
