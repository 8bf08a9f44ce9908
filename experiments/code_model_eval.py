"""Held-out evaluation of the default code model, stage by stage, and its decoding trade-off.

  python experiments/code_model_eval.py [--workdir out/default_model] [--chunks 48]

Reads the stage checkpoints written by `experiments/train_default_model.py` (`code_ar_hf`, ...,
`code_idioms_hf`, `code_cap_hf` and the CAP stage with other weights: `code_cap_off_hf`,
`code_cap_beta05_hf`, `code_cap_beta2_hf`; missing ones are skipped) and two held-out sets:
the standard-library modules of `held_out_files.json` ("stdlib") and generated modules whose
identifier words never occur in the generated training modules ("idioms",
`experiments/python_idioms.py`, split held_out). Per stage and
set, on `--chunks` windows of 128 tokens:

  ar_nll        nats/token of next-token prediction (block 1, every token masked: the exact
                AR log-likelihood); `ar_ppl` = exp(ar_nll)
  bdlm_nelbo    nats/token of the block-32 diffusion negative ELBO (SPEC 5.1 eq. 7: masked
                tokens' -log p weighted by 1/t, t ~ U(0, 1], `--draws` Monte-Carlo draws);
                an upper bound on the model's NLL under block diffusion; `bdlm_ppl` = exp
  mdlm_nelbo    the same with one block over the whole window (MDLM)

Then it decodes, in Quality and Speedy modes (64 new tokens, block 32), two prompt sets: held-out
generated modules cut after their first `def`/`class` line, and held-out standard-library
prefixes of 24 tokens plus "def fibonacci(n):", with the model before the idiom stages
(`code_edit`), `code_idioms`, the CAP runs and the shipped bf16 asset (code_cap): NFE, TPF, edits,
similarity to the true continuation
(`experiments/harness.py` conventions). Writes `experiments/results/code_model.{json,md}` (with
the CAP on/off table) and `code_model_training.png` (every stage's loss curves from its
`metrics.jsonl`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llada_jax  # noqa: E402
from llada_jax import optional  # noqa: E402
from experiments.harness import hardware, hardware_line  # noqa: E402
from experiments.train_default_model import ASSET, HELD_OUT  # noqa: E402
from llada_jax.tokenizer import Tokenizer  # noqa: E402
from llada_jax.train import objectives as obj  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
# The CAP stage's runs (`train_default_model.CAP_CONTROLS`): the same stage with other CAP weights
# (0: the control; 2.0: dFactory's recommended confidence_beta), all from code_idioms; code_cap
# (configs/code_cap.py) is the shipped one.
CAP_RUNS = ("code_cap_off", "code_cap_beta05", "code_cap", "code_cap_beta2")
STAGES = ("code_ar", "code_wsd", "code_edit", "code_idioms") + CAP_RUNS
BRANCHES = {s: "code_cap" for s in CAP_RUNS if s != "code_cap"}  # plotted where code_cap starts
# Decoded: the model before the idiom stages (the previous default), before CAP, the CAP runs;
# code_cap as the shipped bf16 asset.
DECODED = ("code_edit", "code_idioms") + tuple(BRANCHES)
WINDOW, PROMPT_TOKENS, GEN = 128, 24, 64


def held_out_windows(files: list[str], tok, n: int) -> np.ndarray:
  """`[n, WINDOW]` token windows, taken in turn from each held-out file (non-overlapping)."""
  per_file = []
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      ids = tok.encode(f.read())
    per_file.append([ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)])
  out, k = [], 0
  while len(out) < n and any(k < len(w) for w in per_file):
    out += [w[k] for w in per_file if k < len(w)]
    k += 1
  if len(out) < n:
    raise SystemExit(f"only {len(out)} held-out windows of {WINDOW} tokens, asked for {n}")
  return np.asarray(out[:n], np.int32)


@functools.partial(jax.jit, static_argnames=("c", "block_length"))
def _masked_nll(params, tokens, masked, *, c, block_length):
  """Per-token -log p(x_0) `[B, L]` of `tokens` with `masked` positions masked."""
  b, length = tokens.shape
  xt = jnp.where(masked, c.mask_token_id, tokens)
  seg = jnp.zeros((b, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  logits = obj.noisy_logits(params, c, xt, tokens, seg, pos, block_length)
  return obj.token_nll(logits, tokens)[0]


def likelihoods(params, c, windows: np.ndarray, draws: int, seed: int, batch: int = 16) -> dict:
  """AR NLL and block-32 / MDLM negative ELBOs in nats per token (see the module docstring)."""
  rng = np.random.default_rng(seed)
  n, length = windows.shape
  ar, bd, md = [], [], []
  for i in range(0, n, batch):
    x = jnp.asarray(windows[i:i + batch])
    all_masked = jnp.ones(x.shape, bool)
    ar.append(np.asarray(_masked_nll(params, x, all_masked, c=c, block_length=1)).mean(-1))
    for out, block in ((bd, 32), (md, length)):
      vals = []
      for _ in range(draws):
        t = rng.uniform(1e-3, 1.0, (x.shape[0], 1))
        masked = rng.uniform(size=x.shape) < t
        nll = np.asarray(_masked_nll(params, x, jnp.asarray(masked), c=c, block_length=block))
        vals.append((nll * masked).sum(-1) / t[:, 0] / length)
      out.append(np.mean(vals, axis=0))
  ar, bd, md = (float(np.concatenate(v).mean()) for v in (ar, bd, md))
  return dict(ar_nll=ar, ar_ppl=float(np.exp(ar)), bdlm_nelbo=bd, bdlm_ppl=float(np.exp(bd)),
              mdlm_nelbo=md, mdlm_ppl=float(np.exp(md)))


def idiom_prompts(n: int) -> tuple[list[str], list[str]]:
  """(prompts, their true continuations): held-out generated modules (identifier words not in
  the generated training modules), each cut after its first `def` / `class` line: the model is asked to write the body."""
  from experiments import python_idioms
  prompts, rest = [], []
  for doc in python_idioms.documents(n, seed=1, split="held_out"):
    lines = doc.split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith(("def ", "class ")))
    prompts.append("\n".join(lines[:first + 1]) + "\n")
    rest.append(doc[len(prompts[-1]):])
  return prompts, rest


def agreement(text: str, reference: str) -> tuple[float, int]:
  """(difflib similarity ratio of `text` and as many characters of `reference`, the number of
  leading characters they share): how close a continuation is to the true one."""
  import difflib
  ref = reference[:len(text)]
  prefix = next((i for i, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
  return difflib.SequenceMatcher(None, text, ref, autojunk=False).ratio(), prefix


def idiom_windows(tok, n: int) -> np.ndarray:
  """`[n, WINDOW]` token windows of held-out generated modules (seed 2)."""
  from experiments import python_idioms
  ids: list[int] = []
  eos = tok.token_to_id("<|endoftext|>")
  for doc in python_idioms.documents(8 * n, seed=2, split="held_out"):
    ids += tok.encode(doc) + [eos]
    if len(ids) >= n * WINDOW:
      break
  return np.asarray(ids[:n * WINDOW], np.int32).reshape(n, WINDOW)


def decode_modes(params, c, tok, prompts: list[str], references: list[str] | None = None) -> dict:
  """Quality vs Speedy on `prompts` (one batch each; second call timed); with `references` (the
  true continuations, "" for none) also the `agreement` of the rows that have one."""
  out = {}
  ids = [tok.encode(p) for p in prompts]
  for mode in ("quality", "speedy"):
    kw = dict(mode=mode, gen_length=GEN, block_length=32)
    t0 = time.perf_counter()
    llada_jax.generate(params, c, ids, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = llada_jax.generate(params, c, ids, **kw)
    run = time.perf_counter() - t0
    out[mode] = dict(nfe=r.nfe, tpf=r.tpf, edits=r.edits, fills=r.fills,
                     mean_nfe=float(np.mean(r.nfe)), mean_tpf=float(np.mean(r.tpf)),
                     mean_edits=float(np.mean(r.edits)),
                     tokens_per_s=sum(len(o) for o in r.output_ids) / run, run_s=run,
                     first_call_s=first, texts=[tok.decode(o) for o in r.output_ids])
    if references is not None:
      sims, prefixes = zip(*(agreement(t, ref) for t, ref in zip(out[mode]["texts"],
                                                                  references) if ref))
      out[mode].update(similarity=list(sims), prefix_chars=list(prefixes),
                       mean_similarity=float(np.mean(sims)),
                       mean_prefix_chars=float(np.mean(prefixes)))
  return out


def training_curves(workdir: str) -> dict:
  curves = {}
  for stage in STAGES:
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        curves[stage] = [json.loads(line) for line in f]
  return curves


def plot_curves(curves: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, ax_cap) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw=dict(width_ratios=(3, 1)))

  def smooth(values, k=5):  # each logged value is one batch: a running mean of k of them
    v = np.asarray(values, np.float64)
    c = np.cumsum(np.concatenate([[0.0], v]))
    lo = np.maximum(np.arange(1, len(v) + 1) - k, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)

  offset, starts = 0, {}
  for stage in [s for s in STAGES if s in curves and s not in BRANCHES] + [
      s for s in BRANCHES if s in curves]:
    rows = curves[stage]
    start = starts.get(BRANCHES.get(stage), offset)
    starts[stage] = start
    steps = [start + r["step"] for r in rows]
    style = dict(ls="--", alpha=0.8) if stage in BRANCHES else {}
    ax.plot(steps, smooth([r.get("m2t_loss", r["loss"]) for r in rows]),
            label=f"{stage}: M2T loss", **style)
    if any(r.get("t2t_loss", 0) > 0 for r in rows) and stage not in BRANCHES:
      ax.plot(steps, smooth([r["t2t_loss"] for r in rows]),
              label=f"{stage}: T2T (corrupted) loss")
      ax.plot(steps, smooth([r.get("keep_loss", 0.0) for r in rows]),
              label=f"{stage}: keep loss")
    if stage in CAP_RUNS:
      ax_cap.plot([r["step"] for r in rows], smooth([r["accuracy"] for r in rows]),
                  label=f"{stage}: masked accuracy", **style)
      if any(r.get("cap_loss", 0.0) > 0 for r in rows):
        ax_cap.plot([r["step"] for r in rows], smooth([r["cap_loss"] for r in rows]), ls=":",
                    label=f"{stage}: CAP entropy (nats)")
    if rows and stage not in BRANCHES:
      ax.axvline(start, color="k", lw=0.5, alpha=0.4)
      offset = steps[-1]
  ax.set_xlabel("training step (stages in sequence; dashed: the CAP stage with other weights)")
  ax.set_ylabel("nats / token (running mean of 5 logged batches)")
  shown = [s for s in STAGES if s in curves and s not in BRANCHES]
  ax.set_title("Default code model, training stages: " + " -> ".join(shown))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  ax_cap.set_xlabel("CAP stage step")
  ax_cap.set_title("CAP stage: masked accuracy and CAP entropy")
  ax_cap.grid(alpha=0.3)
  ax_cap.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_markdown(path: str, rec: dict) -> None:
  lines = ["# Default code model: held-out likelihood and decoding", "",
           f"Hardware: {hardware_line(rec['hardware'])}.", "",
           f"Held-out data (never trained on): **stdlib**, {rec['n_windows']} windows of {WINDOW} "
           f"tokens from the standard-library modules {', '.join(rec['held_out_modules'])}; "
           f"**idioms**, {rec['n_windows']} windows of generated modules whose identifier words "
           "never occur in the generated training modules and which hold no algorithm units "
           "(`experiments/python_idioms.py`, split held_out). Negative "
           f"ELBOs use {rec['draws']} mask draws per window. All numbers are nats per token.", "",
           "| stage | stdlib AR NLL | stdlib block-32 -ELBO | stdlib MDLM -ELBO | "
           "idioms AR NLL | idioms block-32 -ELBO |",
           "|---|---|---|---|---|---|"]
  for stage, m in rec["likelihood"].items():
    s, i = m["stdlib"], m["idioms"]
    lines.append(f"| {stage} | {s['ar_nll']:.3f} | {s['bdlm_nelbo']:.3f} | {s['mdlm_nelbo']:.3f} "
                 f"| {i['ar_nll']:.3f} | {i['bdlm_nelbo']:.3f} |")
  d = rec["decode"]
  lines += ["", f"Decoding: {GEN} new tokens, block 32, greedy, each prompt set one batch. "
            f"**idioms**: {len(d['prompts']['idioms'])} held-out generated modules cut after their "
            f"first `def`/`class` line; **stdlib**: {len(d['prompts']['stdlib']) - 1} held-out "
            f"standard-library prefixes of {PROMPT_TOKENS} tokens and \"def fibonacci(n):\". "
            "TPF = generated tokens per forward. Similarity: difflib's ratio between the "
            "continuation and as many characters of the true one (the held-out text that "
            "followed the prompt); shared prefix: the characters they share before the first "
            "difference (\"def fibonacci(n):\" has no true continuation and is left out of both).",
            "",
            "| model | prompts | mode | mean NFE | mean TPF | edits/row | similarity | "
            "shared prefix (chars) | tok/s |",
            "|---|---|---|---|---|---|---|---|---|"]
  for model, runs in d["runs"].items():
    for pset, modes in runs.items():
      for mode in ("quality", "speedy"):
        m = modes[mode]
        lines.append(f"| {model} | {pset} | {mode} | {m['mean_nfe']:.1f} | {m['mean_tpf']:.2f} | "
                     f"{m['mean_edits']:.1f} | {m['mean_similarity']:.3f} | "
                     f"{m['mean_prefix_chars']:.1f} | {m['tokens_per_s']:.0f} |")
  caps = [k for k in CAP_RUNS if k in rec["cap_weights"] and d["names"][k] in d["runs"]]
  if len(caps) > 1:
    lines += ["", "## CAP on / off", "",
              "The same CAP stage (`configs/code_cap.py`: same start `code_idioms`, data, seed and "
              "steps) with several CAP weights (`objective.cap_weight`, dFactory's "
              "`confidence_beta`); the shipped run is measured as the bf16 asset, the others as "
              "their fp32 checkpoints. TPF and similarity to the true continuation "
              "(difflib ratio; idioms / stdlib) per mode; likelihoods in nats/token:", "",
              "| run | CAP weight | TPF idioms Q / S | TPF stdlib Q / S | similarity idioms Q / S "
              "| similarity stdlib Q / S | stdlib AR NLL | stdlib block-32 -ELBO | idioms block-32 "
              "-ELBO |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in caps:
      runs, lk = d["runs"][d["names"][stage]], rec["likelihood"].get(stage)
      cell = lambda key, p: " / ".join(f"{runs[p][m][key]:.2f}" for m in ("quality", "speedy"))
      lk_txt = (f"{lk['stdlib']['ar_nll']:.3f} | {lk['stdlib']['bdlm_nelbo']:.3f} | "
                f"{lk['idioms']['bdlm_nelbo']:.3f}" if lk else "- | - | -")
      lines.append(f"| {d['names'][stage]} | {rec['cap_weights'][stage]:g} | "
                   f"{cell('mean_tpf', 'idioms')} | {cell('mean_tpf', 'stdlib')} | "
                   f"{cell('mean_similarity', 'idioms')} | {cell('mean_similarity', 'stdlib')} | "
                   f"{lk_txt} |")
  shipped = d["runs"][d["shipped"]]
  fib = len(d["prompts"]["stdlib"]) - 1
  lines += ["", f"## Samples ({d['shipped']})", "", "\"def fibonacci(n):\":", ""]
  for mode in ("quality", "speedy"):
    m = shipped["stdlib"][mode]
    lines += [f"- {mode}: NFE {m['nfe'][fib]}, TPF {m['tpf'][fib]:.2f}, edits {m['edits'][fib]}",
              "", "```python", "def fibonacci(n):" + m["texts"][fib], "```", ""]
  m = shipped["idioms"]["speedy"]
  lines += [f"The first held-out idiom prompt, speedy: NFE {m['nfe'][0]}, TPF {m['tpf'][0]:.2f}",
            "", "```python", d["prompts"]["idioms"][0] + m["texts"][0], "```", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default=os.path.join(ROOT, "out", "default_model"))
  ap.add_argument("--chunks", type=int, default=48)
  ap.add_argument("--draws", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=15)
  args = ap.parse_args(argv)
  optional.require_or_exit("matplotlib.pyplot", "the training-curve plot")
  with open(os.path.join(args.workdir, "held_out_files.json")) as f:
    held = json.load(f)
  tok = Tokenizer.from_dir(ASSET)
  windows = {"stdlib": held_out_windows(held, tok, args.chunks),
             "idioms": idiom_windows(tok, args.chunks)}
  idioms, idiom_refs = idiom_prompts(args.prompts + 1)
  std = windows["stdlib"][:args.prompts]
  prompts = {"idioms": idioms, "stdlib": [tok.decode(list(w[:PROMPT_TOKENS])) for w in std]
             + ["def fibonacci(n):"]}
  # the true continuations ("def fibonacci(n):" has none: left out of the agreement)
  references = {"idioms": idiom_refs, "stdlib": [tok.decode(list(w[PROMPT_TOKENS:])) for w in std]
                + [""]}
  shipped = "shipped (code_cap, bf16 asset)"
  paths = [(stage, os.path.join(args.workdir, f"{stage}_hf")) for stage in STAGES]
  paths.append((shipped, ASSET))
  names = {stage: stage for stage in DECODED}
  names.update(code_edit="before (code_edit)", code_cap=shipped)
  names[shipped] = shipped
  cap_weights = {}
  for stage in CAP_RUNS:
    record = os.path.join(args.workdir, stage, "config.json")
    if os.path.exists(record):
      with open(record) as f:
        cap_weights[stage] = json.load(f)["train"]["objective"]["cap_weight"]
  lik, runs = {}, {}
  for stage, path in paths:
    if not os.path.exists(os.path.join(path, "config.json")):
      print(f"[eval] {stage}: no checkpoint in {path}, skipped")
      continue
    c, params = llada_jax.load_hf_checkpoint(path)
    t0 = time.perf_counter()
    lik[stage] = {k: likelihoods(params, c, w, args.draws, seed=0) for k, w in windows.items()}
    print(f"[eval] {stage}: {lik[stage]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if stage in DECODED or stage == shipped:
      runs[names[stage]] = {k: decode_modes(params, c, tok, p, references[k])
                            for k, p in prompts.items()}
      for pset, modes in runs[names[stage]].items():
        for mode, m in modes.items():
          print(f"[decode] {names[stage]} {pset} {mode}: mean NFE {m['mean_nfe']:.1f}, "
                f"mean TPF {m['mean_tpf']:.2f}, edits/row {m['mean_edits']:.1f}, similarity "
                f"{m['mean_similarity']:.3f}, prefix {m['mean_prefix_chars']:.1f}", flush=True)
  rec = dict(hardware=hardware(), n_windows=args.chunks, window=WINDOW, draws=args.draws,
             held_out_modules=list(HELD_OUT), held_out_files=len(held), likelihood=lik,
             cap_weights=cap_weights,
             decode=dict(prompts=prompts, runs=runs, shipped=shipped, names=names, gen_length=GEN))
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "code_model.json"), "w") as f:
    json.dump(rec, f, indent=1)
  write_markdown(os.path.join(RESULTS, "code_model.md"), rec)
  curves = training_curves(args.workdir)
  if curves:
    plot_curves(curves, os.path.join(RESULTS, "code_model_training.png"))
  print(f"wrote {RESULTS}/code_model.{{json,md}}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
