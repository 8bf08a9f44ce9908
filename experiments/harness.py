"""One decode setting, measured: accuracy, TPF, tokens/s, batch, hardware, compile vs run time.

  from experiments.harness import evaluate_setting, hardware
  row = evaluate_setting(params, config, examples, tokenizer, name="quality", mode="quality",
                         gen_length=16, block_length=8)

`examples` is a list of `(prompt, answer)` or `(task, prompt, answer)` string tuples. All prompts
are decoded as one batch with `llada_jax.generate` (or in chunks of `batch_size`), greedily
unless the settings say otherwise. The batch is decoded twice: the first call's wall time
includes compiling the decode program (unless an identical program was already compiled in
this process: `compiled` says whether the first call compiled), the second call is the run
time that `tokens_per_s` uses. Both calls must give the same tokens (checked).

Definitions (per setting, over the test rows):
  accuracy      mean of `score(decoded text, answer)` (default: exact match after strip)
  mean_tpf      mean over rows of len(output_ids) / NFE (output_ids include the EOS, as in
                `GenerateResult.tpf`); `tpf_pooled` = total tokens / total NFE
  tokens_per_s  total generated tokens (through the first EOS) / run_s
  compile_s     first_call_s - run_s (an estimate: the first call also runs the program)
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from typing import Callable, Sequence

import jax
import numpy as np

import llada_jax
from llada_jax.decode.generate import decode_jit
from llada_jax.train.toy_tasks import exact_match


def _cpu_name() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo; elsewhere `platform.processor()`)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def hardware() -> dict:
  """Where the numbers were measured."""
  dev = jax.devices()[0]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return dict(processor=_cpu_name(), machine=platform.machine(), cores=cores,
              cpu_count=os.cpu_count(), backend=jax.default_backend(),
              device=getattr(dev, "device_kind", str(dev)), device_count=jax.device_count(),
              jax=jax.__version__, python=platform.python_version(),
              system=f"{platform.system()} {platform.release()}")


def hardware_line(hw: dict | None = None) -> str:
  hw = hw or hardware()
  dev = "" if hw["backend"] == "cpu" else f", {hw['device']} x{hw['device_count']}"
  return (f"{hw['processor']} ({hw['machine']}), {hw['cores']} cores usable, JAX "
          f"{hw['jax']} on {hw['backend']}{dev}, Python {hw['python']}, {hw['system']}")


def _normalise(examples) -> list[tuple[str, str, str]]:
  out = []
  for ex in examples:
    if len(ex) == 2:
      out.append(("all", ex[0], ex[1]))
    elif len(ex) == 3:
      out.append((ex[0], ex[1], ex[2]))
    else:
      raise ValueError(f"an example is (prompt, answer) or (task, prompt, answer), got {ex!r}")
  if not out:
    raise ValueError("no examples")
  return out


def _decode(params, config, prompts, batch_size, kw):
  """Decodes `prompts` in chunks; returns (output_ids, nfe, tpf, fills, edits) lists."""
  ids, nfe, tpf, fills, edits = [], [], [], [], []
  for i in range(0, len(prompts), batch_size):
    r = llada_jax.generate(params, config, prompts[i:i + batch_size], **kw)
    ids += r.output_ids
    nfe += r.nfe
    tpf += r.tpf
    fills += r.fills
    edits += r.edits
  return ids, nfe, tpf, fills, edits


def evaluate_setting(params, config, examples: Sequence, tokenizer, *, name: str = "",
                     batch_size: int | None = None,
                     score: Callable[[str, str], float] = exact_match, keep_outputs: bool = False,
                     **decode_kw) -> dict:
  """Decodes every example's prompt with `decode_kw` (any `llada_jax.generate` keyword, e.g.
  `mode`, `algorithm`, `threshold`, `mbe_window`) and returns one JSON-able row of results."""
  rows = _normalise(examples)
  prompts = [tokenizer.encode(p) for _, p, _ in rows]
  bs = len(prompts) if batch_size is None else int(batch_size)
  kw = dict(decode_kw)
  kw.setdefault("temperature", 0.0)
  before = decode_jit._cache_size()
  t0 = time.perf_counter()
  first = _decode(params, config, prompts, bs, kw)
  first_s = time.perf_counter() - t0
  compiled = decode_jit._cache_size() > before
  t0 = time.perf_counter()
  ids, nfe, tpf, fills, edits = _decode(params, config, prompts, bs, kw)
  run_s = time.perf_counter() - t0
  if ids != first[0] or nfe != first[1]:
    raise RuntimeError(f"setting {name!r}: two identical decode calls disagree")
  texts = [tokenizer.decode(o) for o in ids]
  scores = np.array([score(t, a) for t, (_, _, a) in zip(texts, rows)], np.float64)
  by_task = defaultdict(list)
  for s, (task, _, _) in zip(scores, rows):
    by_task[task].append(s)
  tokens = int(sum(len(o) for o in ids))
  out = dict(
      name=name, settings={k: v for k, v in kw.items()}, n=len(rows), batch_size=bs,
      accuracy=float(scores.mean()),
      accuracy_by_task={k: float(np.mean(v)) for k, v in sorted(by_task.items())},
      mean_tpf=float(np.mean(tpf)), tpf_pooled=tokens / max(sum(nfe), 1),
      mean_nfe=float(np.mean(nfe)), fills=int(sum(fills)), edits=int(sum(edits)),
      edits_per_row=float(np.mean(edits)), tokens=tokens, tokens_per_s=tokens / run_s,
      first_call_s=first_s, run_s=run_s, compile_s=max(first_s - run_s, 0.0), compiled=compiled,
      hardware=hardware(), jax_version=jax.__version__)
  if keep_outputs:
    out["outputs"] = [dict(task=t, prompt=p, answer=a, output=x, score=float(s))
                      for (t, p, a), x, s in zip(rows, texts, scores)]
  return out
