"""Held-out evaluation of the default code model, stage by stage, and its decoding trade-off.

  python experiments/code_model_eval.py [--workdir out/default_model] [--chunks 48]

Reads the stage checkpoints written by `experiments/train_default_model.py` (`code_ar_hf`,
`code_wsd_hf`, `code_edit_hf`) and the held-out standard-library modules it never trained on
(`held_out_files.json`), and measures, per stage, on `--chunks` windows of 128 tokens:

  ar_nll        nats/token of next-token prediction (block 1, every token masked: the exact
                AR log-likelihood); `ar_ppl` = exp(ar_nll)
  bdlm_nelbo    nats/token of the block-32 diffusion negative ELBO (SPEC 5.1 eq. 7: masked
                tokens' -log p weighted by 1/t, t ~ U(0, 1], `--draws` Monte-Carlo draws);
                an upper bound on the model's NLL under block diffusion; `bdlm_ppl` = exp
  mdlm_nelbo    the same with one block over the whole window (MDLM)

and, for the final model, decodes `--prompts` held-out code prompts (the first 24 tokens of
held-out windows) plus "def fibonacci(n):" in Quality and Speedy modes (64 new tokens, block 32):
NFE, TPF, edits (`experiments/harness.py` conventions). Writes
`experiments/results/code_model.{json,md}` and `code_model_training.png` (the loss curves of the
three stages from their `metrics.jsonl`). The shipped bf16 asset is measured too (and is the
model decoded, unless --no-decode-asset).
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
STAGES = ("code_ar", "code_wsd", "code_edit")
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


def decode_modes(params, c, tok, prompts: list[str]) -> dict:
  """Quality vs Speedy on `prompts` (one batch each; second call timed)."""
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
  fig, ax = plt.subplots(figsize=(9, 4.5))

  def smooth(values, k=5):  # each logged value is one batch: a running mean of k of them
    v = np.asarray(values, np.float64)
    c = np.cumsum(np.concatenate([[0.0], v]))
    lo = np.maximum(np.arange(1, len(v) + 1) - k, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)

  offset = 0
  for stage, rows in curves.items():
    steps = [offset + r["step"] for r in rows]
    ax.plot(steps, smooth([r.get("m2t_loss", r["loss"]) for r in rows]),
            label=f"{stage}: M2T loss")
    if any(r.get("t2t_loss", 0) > 0 for r in rows):
      ax.plot(steps, smooth([r["t2t_loss"] for r in rows]),
              label=f"{stage}: T2T (corrupted) loss")
      ax.plot(steps, smooth([r.get("keep_loss", 0.0) for r in rows]),
              label=f"{stage}: keep loss")
    if rows:
      ax.axvline(offset, color="k", lw=0.5, alpha=0.4)
      offset = steps[-1]
  ax.set_xlabel("training step (stages in sequence)")
  ax.set_ylabel("nats / token (running mean of 5 logged batches)")
  ax.set_title("Default code model: AR -> WSD (block 4..128..32) -> M2T+T2T editing")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_markdown(path: str, rec: dict) -> None:
  lines = ["# Default code model: held-out likelihood and decoding", "",
           f"Hardware: {hardware_line(rec['hardware'])}.", "",
           f"Held-out data: {rec['n_windows']} windows of {WINDOW} tokens from the standard-library "
           f"modules {', '.join(rec['held_out_modules'])} (never trained on). Negative ELBOs use "
           f"{rec['draws']} mask draws per window. All numbers are nats per token.", "",
           "| stage | AR NLL | AR ppl | block-32 -ELBO | block-32 ppl bound | MDLM -ELBO |",
           "|---|---|---|---|---|---|"]
  for stage, m in rec["likelihood"].items():
    lines.append(f"| {stage} | {m['ar_nll']:.3f} | {m['ar_ppl']:.1f} | {m['bdlm_nelbo']:.3f} | "
                 f"{m['bdlm_ppl']:.1f} | {m['mdlm_nelbo']:.3f} |")
  d = rec["decode"]
  lines += ["", f"Decoding ({os.path.relpath(d['model'], ROOT)}), {len(d['prompts'])} prompts (held-out code prefixes of "
            f"{PROMPT_TOKENS} tokens and \"def fibonacci(n):\"), {GEN} new tokens, block 32, "
            "one batch, greedy:", "",
            "| mode | mean NFE | mean TPF | edits/row | tok/s | run s | first s |",
            "|---|---|---|---|---|---|---|"]
  for mode in ("quality", "speedy"):
    m = d[mode]
    lines.append(f"| {mode} | {m['mean_nfe']:.1f} | {m['mean_tpf']:.2f} | {m['mean_edits']:.1f} "
                 f"| {m['tokens_per_s']:.0f} | {m['run_s']:.2f} | {m['first_call_s']:.2f} |")
  fib = len(d["prompts"]) - 1
  lines += ["", "\"def fibonacci(n):\" (last row of the batch):", ""]
  for mode in ("quality", "speedy"):
    m = d[mode]
    lines += [f"- {mode}: NFE {m['nfe'][fib]}, TPF {m['tpf'][fib]:.2f}, edits {m['edits'][fib]}",
              "", "```python", "def fibonacci(n):" + m["texts"][fib], "```", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default=os.path.join(ROOT, "out", "default_model"))
  ap.add_argument("--chunks", type=int, default=48)
  ap.add_argument("--draws", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=15)
  ap.add_argument("--decode-asset", action=argparse.BooleanOptionalAction, default=True,
                  help="decode with the shipped bf16 asset (default) instead of the fp32 stage")
  args = ap.parse_args(argv)
  optional.require_or_exit("matplotlib.pyplot", "the training-curve plot")
  with open(os.path.join(args.workdir, "held_out_files.json")) as f:
    held = json.load(f)
  final = os.path.join(args.workdir, f"{STAGES[-1]}_hf")
  tok = Tokenizer.from_dir(final)
  windows = held_out_windows(held, tok, args.chunks)
  decode_path = ASSET if args.decode_asset else final
  lik, decode_model = {}, None
  paths = [(stage, os.path.join(args.workdir, f"{stage}_hf")) for stage in STAGES]
  paths.append(("shipped (bf16 asset)", ASSET))
  for stage, path in paths:
    if not os.path.exists(os.path.join(path, "config.json")):
      print(f"[eval] {stage}: no checkpoint in {path}, skipped")
      continue
    c, params = llada_jax.load_hf_checkpoint(path)
    t0 = time.perf_counter()
    lik[stage] = likelihoods(params, c, windows, args.draws, seed=0)
    print(f"[eval] {stage}: {lik[stage]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if path == decode_path:
      decode_model = (c, params)
  c, params = decode_model or llada_jax.load_hf_checkpoint(decode_path)
  prompts = [tok.decode(list(w[:PROMPT_TOKENS])) for w in windows[:args.prompts]]
  prompts.append("def fibonacci(n):")
  dec = decode_modes(params, c, tok, prompts)
  dec["prompts"] = prompts
  for mode in ("quality", "speedy"):
    print(f"[decode] {mode}: mean NFE {dec[mode]['mean_nfe']:.1f}, "
          f"mean TPF {dec[mode]['mean_tpf']:.2f}, edits/row {dec[mode]['mean_edits']:.1f}")
  dec["model"] = decode_path
  rec = dict(hardware=hardware(), n_windows=len(windows), window=WINDOW, draws=args.draws,
             held_out_modules=list(HELD_OUT), held_out_files=len(held), likelihood=lik,
             decode=dec)
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
