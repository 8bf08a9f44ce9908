"""The LLaDA2.1 speed/quality trade-off in miniature, on CPU, with exactly checked answers.

  python experiments/paper_in_miniature.py [--steps 2500] [--finish-steps 400] [--per-task 128]
                                           [--train-only]

1. Training mirrors LLaDA2.0 -> LLaDA2.1 at toy scale. A small byte-level LLaDA2 MoE model
   (hidden 128, 3 layers, 8 experts) is trained with this package's `Trainer` on the
   `bench_mix@train` toy task (2-digit addition, reversal of 3-6 letters, sorting of 3-6 digits,
   copying either of two words (`pick`: two right answers, so parallel filling can mix them);
   `llada_jax.train.toy_tasks`) with the plain M2T objective: `base`. Two models then continue
   from it on the same fresh data stream for the same number of steps: `m2t` with the M2T
   objective only (edit_rate = mtf_rate = 0) and `editing` with the LLaDA2.1 mixed objective
   (random-token corruption edit_rate 0.1 + multi-turn-forward drafts mtf_rate 0.2 + the keep
   loss on clean visible tokens, keep_weight 1). So the two
   compared models share init, data, step count and block schedule (block 16, then 8) and
   differ only in the finishing objective.
   Each model is cached in `out/miniature/<name>/hf` (an HF checkpoint): re-runs skip training.
2. The test split (`bench_<task>@test`: prompts whose hash puts them in the held-out 10%; the
   training streams never draw them, which is checked) is decoded in one batch per setting,
   greedily: LLaDA2.0 threshold decoding (threshold 0.95; steps = block length, and half of
   it), LLaDA2.1 Quality and Speedy, both also with multi-block editing (mbe_window 2), and
   threshold sweeps of 2.0 / Quality-style (tau_edit 0.5) / Speedy-style (tau_edit 0) decoding
   for `m2t` and `editing` (`base` gets the named settings only). Per setting: accuracy (also
   per task), mean TPF, tokens/s, batch, hardware, JAX version, first-call vs second-call time
   (`experiments/harness.py`).
3. Writes `experiments/results/miniature.{json,md}`, `threshold_sweep.png` and `modes.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llada_jax  # noqa: E402
from llada_jax import optional  # noqa: E402
from experiments.harness import evaluate_setting, hardware, hardware_line  # noqa: E402
from llada_jax.train import toy_tasks  # noqa: E402
from llada_jax.train.data import ByteTokenizer  # noqa: E402

OUT = os.path.join(ROOT, "out", "miniature")
RESULTS = os.path.join(ROOT, "experiments", "results")
TASKS = ("add2", "rev", "sort", "pick")
TRAIN_TASK = "bench_mix@train"
TEST_SEED = 12345  # the training stream uses seed 0 (Trainer: seed * 1_000_003 + batch index)
BLOCK, SEQ, GEN = 8, 32, 16
BYTE_IDS = dict(vocab_size=264, eos_token_id=256, pad_token_id=257, mask_token_id=258)
MODEL = dict(BYTE_IDS, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=256, num_experts=8,
             num_experts_per_tok=2, moe_intermediate_size=64, n_group=4, topk_group=2,
             max_position_embeddings=64)
M2T = dict(edit_rate=0.0, mtf_rate=0.0)
EDITING = dict(edit_rate=0.1, mtf_rate=0.2, keep_weight=1.0)
OBJECTIVES = {"m2t": M2T, "editing": EDITING}  # the two compared models
LABELS = {"base": "base (M2T)", "m2t": "M2T-only", "editing": "M2T+T2T (editing)"}


def model_specs(steps: int, finish_steps: int) -> dict[str, dict]:
  """name -> how it is trained (`init`: the model it continues from; `blocks`: the block-length
  stages of the finishing runs, 2 x BLOCK then BLOCK, so that the 2-block window of multi-block
  editing is a context the models were trained on)."""
  half = finish_steps // 2
  blocks = [[half, 2 * BLOCK], [finish_steps - half, BLOCK]]
  return {
      "base": dict(init=None, steps=steps, seed=0, lr=3e-3, warmup=20, objective=M2T),
      "m2t": dict(init="base", steps=finish_steps, seed=1, lr=1e-3, warmup=10, objective=M2T,
                  blocks=blocks),
      "editing": dict(init="base", steps=finish_steps, seed=1, lr=1e-3, warmup=10,
                      objective=EDITING, blocks=blocks),
  }


def tokenizer() -> ByteTokenizer:
  return ByteTokenizer(eos_id=256, pad_id=257, mask_id=258, vocab_size=264)


# ---- training -----------------------------------------------------------------------------------
def train_config(name: str, spec: dict):
  from llada_jax.train.defaults import base_config
  c = base_config()
  c.seed = spec["seed"]
  c.steps = spec["steps"]
  c.model.preset = "tiny"
  c.model.overrides.update(MODEL)
  if spec["init"]:
    c.init_from = os.path.join(OUT, spec["init"], "hf")
  c.data.task = TRAIN_TASK
  c.data.eos_padding = "block"
  c.data.seq_len, c.data.batch_size = SEQ, 32
  c.objective.block_length = BLOCK
  c.objective.t_min, c.objective.t_max = 0.1, 1.0  # decoding starts from a fully masked block
  c.objective.update(spec["objective"])
  if spec.get("blocks"):
    c.wsd.enabled = True
    c.wsd.stages = tuple((int(s), int(b)) for s, b in spec["blocks"])
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = spec["lr"], spec["warmup"], "cosine"
  c.log_every, c.ckpt_every, c.keep = 25, spec["steps"], 1
  c.export_hf = os.path.join(OUT, name, "hf")
  return c


def train(name: str, spec: dict) -> dict:
  """Trains (or finds cached) model `name`; returns its training record."""
  rec_path = os.path.join(OUT, name, "train.json")
  cfg = train_config(name, spec)
  if os.path.exists(os.path.join(cfg.export_hf, "config.json")) and os.path.exists(rec_path):
    with open(rec_path) as f:
      rec = json.load(f)
    if rec.get("spec") == json.loads(json.dumps(spec)):
      print(f"[train] {name}: cached in {cfg.export_hf} ({rec['train_s']:.0f} s when trained)")
      return dict(rec, cached=True)
  from llada_jax.train.trainer import Trainer
  workdir = os.path.join(OUT, name, "work")
  if os.path.exists(workdir):
    import shutil
    shutil.rmtree(workdir)
  print(f"[train] {name}: {spec} ...", flush=True)
  t0 = time.perf_counter()
  last = Trainer(cfg, workdir, progress=False).run()
  train_s = time.perf_counter() - t0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    curve = [json.loads(line) for line in f]
  rec = dict(name=name, spec=spec, steps=spec["steps"], train_s=train_s,
             objective=spec["objective"], final=last,
             curve=[{k: r[k] for k in ("step", "loss", "m2t_loss", "t2t_loss", "accuracy")}
                    for r in curve],
             model=MODEL, data=dict(task=TRAIN_TASK, seq_len=SEQ, batch_size=32,
                                    eos_padding="block", block_length=BLOCK, seed=spec["seed"]),
             hardware=hardware())
  with open(rec_path, "w") as f:
    json.dump(rec, f, indent=1)
  print(f"[train] {name}: {train_s:.0f} s, final loss {last.get('loss', float('nan')):.3f}")
  return dict(rec, cached=False)


# ---- data ---------------------------------------------------------------------------------------
def valid_answers(task: str, prompt: str, answer: str) -> str:
  """The `|`-separated right answers (`toy_tasks.match_any` scores against them)."""
  return "|".join(toy_tasks.pick_options(prompt)) if task == "pick" else answer


def test_set(per_task: int, tasks=TASKS) -> list[tuple[str, str, str]]:
  """`(task, prompt, valid answers)` for `per_task` held-out prompts of each task."""
  out = []
  for i, task in enumerate(tasks):
    out += [(task, p, valid_answers(task, p, a)) for p, a in
            toy_tasks.unique_examples(f"bench_{task}@test", per_task, TEST_SEED + i)]
  return out


def training_prompts(specs: dict) -> set[str]:
  """Every prompt the training streams drew (regenerated exactly as `Trainer` draws them)."""
  from llada_jax.train.trainer import TaskSource
  seen = set()
  for spec in specs.values():
    src = TaskSource(TRAIN_TASK, tokenizer(), SEQ, 32, spec["seed"], BLOCK)
    seen |= {p for i in range(spec["steps"]) for p, _ in src._examples(i)}
  return seen


# ---- evaluation ---------------------------------------------------------------------------------
SWEEP = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
FAMILIES = {  # sweep family -> decode settings (the threshold is swept)
    "llada2.0": dict(algorithm="llada2.0", steps=BLOCK),
    "quality-style": dict(mode="quality"),  # tau_edit 0.5, 16 post-steps
    "speedy-style": dict(mode="speedy"),  # tau_edit 0.0, 16 post-steps
}


def named_settings() -> list[tuple[str, dict]]:
  return [
      ("LLaDA2.0 thr0.95 steps8", dict(algorithm="llada2.0", threshold=0.95, steps=BLOCK)),
      ("LLaDA2.0 thr0.95 steps4", dict(algorithm="llada2.0", threshold=0.95, steps=BLOCK // 2)),
      ("Quality", dict(mode="quality")),
      ("Speedy", dict(mode="speedy")),
      ("Quality +MBE2", dict(mode="quality", mbe_window=2)),
      ("Speedy +MBE2", dict(mode="speedy", mbe_window=2)),
  ]


def evaluate(models: dict, examples, tok) -> list[dict]:
  rows = []
  for model_name, (config, params) in models.items():
    jobs = [(n, kw, None) for n, kw in named_settings()]
    if model_name in OBJECTIVES:  # the sweeps: for the two compared models
      for fam, kw in FAMILIES.items():
        jobs += [(f"sweep {fam} thr{thr}", dict(kw, threshold=thr), fam) for thr in SWEEP]
    for name, kw, family in jobs:
      kw = dict(kw, gen_length=GEN, block_length=BLOCK)
      kw.setdefault("mode", "quality")  # llada2.0 ignores the mode's editing knobs
      row = evaluate_setting(params, config, examples, tok, name=name, keep_outputs=True,
                             score=toy_tasks.match_any, **kw)
      row["outputs"] = [o["output"] for o in row["outputs"]]  # rows as in meta["test_set"]
      row.update(model=model_name, family=family,
                 threshold=kw.get("threshold", llada_jax.DecodeSettings.for_mode(
                     kw["mode"]).threshold))
      rows.append(row)
      print(f"[eval] {model_name:8s} {name:34s} acc {row['accuracy']:.3f} "
            f"({' '.join(f'{k} {v:.2f}' for k, v in row['accuracy_by_task'].items())}) "
            f"TPF {row['mean_tpf']:.2f} edits/row {row['edits_per_row']:.2f} "
            f"{row['tokens_per_s']:.0f} tok/s run {row['run_s']:.2f}s "
            f"first {row['first_call_s']:.2f}s{' (compiled)' if row['compiled'] else ''}",
            flush=True)
  return rows


# ---- reports ------------------------------------------------------------------------------------
def write_markdown(path: str, rows, train_recs, meta) -> None:
  hw = meta["hardware"]
  lines = ["# Paper in miniature: speed/quality on exact-answer toy tasks", "",
           f"Hardware: {hardware_line(hw)}.", "",
           f"Test set: {meta['n_test']} prompts ({meta['per_task']} each of "
           f"{', '.join(TASKS)}; held-out split, {meta['overlap']} shared with the "
           f"{meta['n_train_prompts']} distinct training prompts). One batch of all "
           f"{meta['n_test']} prompts per setting, greedy, gen_length {GEN}, block {BLOCK}.", "",
           "Models (M2T-only and editing continue from base on the same data stream; they "
           "differ only in the objective of those steps):", ""]
  for r in train_recs:
    sp = r["spec"]
    lines.append(
        f"- {LABELS[r['name']]}: {sp['steps']} steps"
        + (f" from {sp['init']}" if sp["init"] else " from random init")
        + f", data seed {sp['seed']}, lr {sp['lr']}, "
        + (f"blocks {' then '.join(f'{b} ({s} steps)' for s, b in sp['blocks'])}, "
           if sp.get("blocks") else f"block {BLOCK}, ")
        + f"edit_rate {sp['objective']['edit_rate']}, mtf_rate {sp['objective']['mtf_rate']}"
        + (f", keep_weight {sp['objective']['keep_weight']}"
           if "keep_weight" in sp["objective"] else "") + "; final loss "
        f"{r['final'].get('loss', float('nan')):.3f} (M2T part "
        f"{r['final'].get('m2t_loss', float('nan')):.3f}); trained in {r['train_s']:.0f} s")
  lines += ["",
           "TPF = generated tokens (through EOS) per counted forward, mean over rows. run = "
           "second call (tokens/s uses it); first = first call (includes compilation when "
           "'compiled').", "",
           "| model | setting | acc | " + " | ".join(TASKS) + " | TPF | NFE | edits/row | "
           "tok/s | run s | first s | compiled | batch |",
           "|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["family"] is not None:
      continue
    t = r["accuracy_by_task"]
    lines.append(
        f"| {LABELS[r['model']]} | {r['name']} | {r['accuracy']:.3f} | "
        + "".join(f"{t.get(k, 0):.2f} | " for k in TASKS) + f"{r['mean_tpf']:.2f} | "
        f"{r['mean_nfe']:.1f} | {r['edits_per_row']:.2f} | {r['tokens_per_s']:.0f} | "
        f"{r['run_s']:.2f} | {r['first_call_s']:.2f} | {'yes' if r['compiled'] else 'no'} | "
        f"{r['batch_size']} |")
  lines += ["", "## Threshold sweeps (accuracy / TPF)", "",
            "| model | family | " + " | ".join(f"thr {t}" for t in SWEEP) + " |",
            "|---|---|" + "---|" * len(SWEEP)]
  for model in OBJECTIVES:
    for fam in FAMILIES:
      cells = []
      for thr in SWEEP:
        r = next(x for x in rows if x["model"] == model and x["family"] == fam
                 and x["threshold"] == thr)
        cells.append(f"{r['accuracy']:.3f} / {r['mean_tpf']:.2f}")
      lines.append(f"| {LABELS[model]} | {fam} | " + " | ".join(cells) + " |")
  lines += ["", "## Summary (computed)", ""] + summary_lines(rows)
  lines += ["", f"Wall time: training {meta['train_s']:.0f} s "
            f"({'cached' if meta['train_cached'] else 'this run'}), evaluation "
            f"{meta['eval_s']:.0f} s.", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def _row(rows, model, name):
  return next((r for r in rows if r["model"] == model and r["name"] == name), None)


def summary_lines(rows) -> list[str]:
  """The comparisons the paper's tables make, read off this run's rows."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    q, sp = _row(rows, model, "Quality"), _row(rows, model, "Speedy")
    v20 = _row(rows, model, "LLaDA2.0 thr0.95 steps8")
    qm, sm = _row(rows, model, "Quality +MBE2"), _row(rows, model, "Speedy +MBE2")
    best = max((r for r in rows if r["model"] == model), key=lambda r: r["accuracy"])
    out.append(
        f"- {LABELS[model]}: Speedy vs Quality: TPF {sp['mean_tpf']:.2f} vs {q['mean_tpf']:.2f} "
        f"({sp['mean_tpf'] / q['mean_tpf']:.2f}x), accuracy {sp['accuracy']:.3f} vs "
        f"{q['accuracy']:.3f}; Quality vs LLaDA2.0 (thr 0.95): accuracy {q['accuracy']:.3f} vs "
        f"{v20['accuracy']:.3f}, TPF {q['mean_tpf']:.2f} vs {v20['mean_tpf']:.2f}; MBE2: Speedy "
        f"accuracy {sp['accuracy']:.3f} -> {sm['accuracy']:.3f}, TPF {sp['mean_tpf']:.2f} -> "
        f"{sm['mean_tpf']:.2f} (Quality {q['accuracy']:.3f} -> {qm['accuracy']:.3f}, TPF "
        f"{q['mean_tpf']:.2f} -> {qm['mean_tpf']:.2f}); best accuracy {best['accuracy']:.3f} "
        f"({best['name']}, TPF {best['mean_tpf']:.2f}).")
  for model in OBJECTIVES:  # aggressive drafting vs editing, on the task with two answers
    cells = []
    for fam in FAMILIES:
      lo = _row(rows, model, f"sweep {fam} thr{SWEEP[0]}")
      hi = _row(rows, model, f"sweep {fam} thr0.95")
      if lo and hi:
        cells.append(f"{fam} {hi['accuracy_by_task'].get('pick', 0):.2f} -> "
                     f"{lo['accuracy_by_task'].get('pick', 0):.2f} (TPF {hi['mean_tpf']:.2f} -> "
                     f"{lo['mean_tpf']:.2f})")
    if cells:
      out.append(f"- {LABELS[model]}, `pick` accuracy from threshold 0.95 to {SWEEP[0]}: "
                 + "; ".join(cells) + ".")
  return out


def plot(rows, out_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {"llada2.0": "tab:gray", "quality-style": "tab:blue", "speedy-style": "tab:orange"}
  styles = {"m2t": dict(ls="--", marker="o", mfc="white"), "editing": dict(ls="-", marker="s")}
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for model in OBJECTIVES:
    for fam in FAMILIES:
      pts = sorted(((r["mean_tpf"], r["accuracy"], r["threshold"]) for r in rows
                    if r["model"] == model and r["family"] == fam))
      if not pts:
        continue
      x, y, th = zip(*pts)
      ax.plot(x, y, color=colors[fam], label=f"{LABELS[model]} / {fam}", **styles[model])
      for xi, yi, ti in zip(x, y, th):
        if ti in (0.3, 0.95):
          ax.annotate(f"{ti}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                      fontsize=7, color=colors[fam])
  ax.set_xlabel("tokens per forward (mean over test rows)")
  ax.set_ylabel("accuracy (exact answer; pick: either word), all tasks")
  ax.set_title("Threshold sweep (labels: tau_mask); dashed = M2T-only model")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "threshold_sweep.png"), dpi=120)
  plt.close(fig)

  named = [n for n, _ in named_settings()]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
  models = list(dict.fromkeys(r["model"] for r in rows))
  width = 0.8 / len(models)
  colors = {"base": "#bbbbbb", "m2t": "tab:gray", "editing": "tab:green"}
  for k, model in enumerate(models):
    rs = [next(r for r in rows if r["model"] == model and r["name"] == n) for n in named]
    xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(named))]
    kw = dict(width=width, label=LABELS[model], color=colors.get(model, f"C{k}"))
    b1 = a1.bar(xs, [r["accuracy"] for r in rs], **kw)
    b2 = a2.bar(xs, [r["mean_tpf"] for r in rs], **kw)
    a1.bar_label(b1, fmt="%.2f", fontsize=7)
    a2.bar_label(b2, fmt="%.2f", fontsize=7)
  for ax, title in ((a1, "accuracy (exact answer)"), (a2, "tokens per forward")):
    ax.set_xticks(range(len(named)))
    ax.set_xticklabels(named, rotation=25, ha="right", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Decoding modes on the held-out test split (one batch, greedy)")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "modes.png"), dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=2500, help="base model training steps")
  ap.add_argument("--finish-steps", type=int, default=400,
                  help="steps of the M2T-only / editing continuation")
  ap.add_argument("--per-task", type=int, default=128)
  ap.add_argument("--train-only", action="store_true")
  ap.add_argument("--report-only", action="store_true",
                  help="rebuild miniature.md and the plots from miniature.json")
  args = ap.parse_args(argv)
  optional.require_or_exit("matplotlib.pyplot", "the miniature plots")
  os.makedirs(OUT, exist_ok=True)
  os.makedirs(RESULTS, exist_ok=True)
  if args.report_only:
    with open(os.path.join(RESULTS, "miniature.json")) as f:
      saved = json.load(f)
    write_markdown(os.path.join(RESULTS, "miniature.md"), saved["results"], saved["training"],
                   saved["meta"])
    plot(saved["results"], RESULTS)
    return 0
  specs = model_specs(args.steps, args.finish_steps)
  names = list(specs)
  t0 = time.perf_counter()
  recs = [train(n, specs[n]) for n in names]
  train_s = time.perf_counter() - t0
  if args.train_only:
    return 0
  tok = tokenizer()
  examples = test_set(args.per_task)
  seen = training_prompts(specs)
  overlap = sum(p in seen for _, p, _ in examples)
  if overlap:
    raise SystemExit(f"{overlap} test prompts were drawn by the training stream")
  models = {n: llada_jax.load_hf_checkpoint(os.path.join(OUT, n, "hf")) for n in names}
  t1 = time.perf_counter()
  rows = evaluate(models, examples, tok)
  eval_s = time.perf_counter() - t1
  meta = dict(hardware=hardware(), n_test=len(examples), per_task=args.per_task,
              overlap=overlap, n_train_prompts=len(seen), train_s=sum(r["train_s"] for r in recs),
              train_cached=all(r["cached"] for r in recs), eval_s=eval_s,
              train_wall_s_this_run=train_s, gen_length=GEN, block_length=BLOCK,
              test_seed=TEST_SEED, sweep=SWEEP, test_set=[list(e) for e in examples])
  with open(os.path.join(RESULTS, "miniature.json"), "w") as f:
    json.dump(dict(meta=meta, training=recs, results=rows), f, indent=1)
  write_markdown(os.path.join(RESULTS, "miniature.md"), rows, recs, meta)
  plot(rows, RESULTS)
  print(f"[done] train {train_s:.0f} s (this run), eval {eval_s:.0f} s; wrote {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
