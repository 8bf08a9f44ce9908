"""Post-training on data files, in miniature: EBPO with a verifiable reward and ELBO-DPO on
preference pairs, each against an lr=0 control with the same seeds.

  python experiments/post_training.py [--sft-steps 120] [--rl-steps 80] [--rl-prompts 16]
      [--dpo-steps 60] [--noise-ablation]

With `--task` (bench_add2, bench_rev) the same on another benchmark task, with its own result
files; `bench_rev` is rewarded by exact match. The steps, for the default `bench_sort`:
1. `base`: a small byte-level LLaDA2 MoE model (the miniature benchmark's widths) trained by the
   `Trainer` for `--sft-steps` steps on `bench_sort@train` (sort 3-6 digits) with the M2T
   objective, few enough that its sampled answers are right about half of the time: the regime
   where RL has signal.
2. Data files, as a user would bring them: `prompts.jsonl` (`{"prompt", "answer"}`, 512 training
   prompts) and `pairs.jsonl` (`{"prompt", "chosen", "rejected"}`: the right answer vs the
   answer with two digits swapped, another 512 prompts).
3. EBPO from `base` on `prompts.jsonl` with `reward=math` (the final number of the response
   against the answer), G = 8 rollouts for each of `--rl-prompts` prompts per step from our
   decoder (Quality settings at temperature 1, T2T off: see EDITING_THRESHOLD), per-block
   clipped ratios, the masks shared by a prompt's rollouts (`ebpo.noise="group"`: the recorded
   run predates the variance measurement that made "complementary" the trainer's default, and
   `--noise-ablation` also runs "independent" and "complementary"); the same run with lr = 0 is
   the control: the same rollout seeds, so their reward curves differ only by what the updates
   changed.
4. ELBO-DPO from `base` on `pairs.jsonl`, and its lr = 0 control.
5. Every model is measured on 256 held-out prompts (`bench_sort@test`, never in the data files):
   greedy accuracy in Quality mode, and the accuracy of temperature-1 samples (4 seeds), T2T off.
Writes `experiments/results/post_training.{json,md}` and `post_training.png` (with `--task`
another benchmark task, e.g. `bench_add2`: `post_training_bench_add2.*`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import llada_jax  # noqa: E402
from experiments.harness import evaluate_setting, hardware, hardware_line  # noqa: E402
from llada_jax import optional  # noqa: E402
from llada_jax.train import toy_tasks  # noqa: E402
from llada_jax.train.data import ByteTokenizer  # noqa: E402

OUT = os.path.join(ROOT, "out", "post_training")
RESULTS = DEFAULT_RESULTS = os.path.join(ROOT, "experiments", "results")
TASK = DEFAULT_TASK = "bench_sort"  # --task: any of toy_tasks.BENCHMARK but bench_pick (two right answers)
TASK_TEXT = {"bench_sort": "sort 3-6 digits", "bench_add2": "add two 2-digit numbers",
             "bench_rev": "reverse 3-6 letters"}
REWARD = {"bench_rev": "exact_match"}  # else math: the response's final number
BLOCK, SEQ, GEN = 8, 32, 8
BYTE_IDS = dict(vocab_size=264, eos_token_id=256, pad_token_id=257, mask_token_id=258)
MODEL = dict(BYTE_IDS, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=256, num_experts=8,
             num_experts_per_tok=2, moe_intermediate_size=64, n_group=4, topk_group=2,
             max_position_embeddings=64)
TEST_SEED, DATA_SEED = 12345, 777
# The base model is trained on the M2T objective only: its predictions at unmasked positions were
# never trained, so T2T edits (editing_threshold < 1) rewrite right answers at random (300 SFT
# steps: held-out greedy accuracy 0.98 with T2T off, 0.37 with the Quality preset's 0.5).
# Rollouts and evaluation decode with T2T off.
EDITING_THRESHOLD = 1.0


def tokenizer() -> ByteTokenizer:
  return ByteTokenizer(eos_id=256, pad_id=257, mask_id=258, vocab_size=264)


def _base_config(stage: str, steps: int, lr: float):
  from llada_jax.train.defaults import base_config  # noqa: PLC0415
  c = base_config()
  c.stage, c.steps, c.seed = stage, steps, 0
  c.model.overrides.update(MODEL)
  c.data.seq_len, c.data.batch_size = SEQ, 32
  c.objective.block_length = BLOCK
  c.objective.t_min, c.objective.t_max = 0.1, 1.0
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = lr, 10, "constant"
  c.log_every, c.ckpt_every, c.keep = 1, steps, 1
  return c


def sft_config(steps: int, task: str = ""):
  c = _base_config("bdlm", steps, 3e-3)
  c.optim.schedule = "cosine"
  c.data.task = task or f"{TASK}@train"
  c.data.eos_padding = "block"
  c.log_every = 25
  return c


def ebpo_config(steps: int, lr: float, base: str, prompts: str, reward: str = "math",
                prompts_per_step: int = 16, noise: str = "group"):
  c = _base_config("ebpo", steps, lr)
  c.init_from, c.data.source, c.reward = base, prompts, reward
  c.data.eos_padding = "block"  # score the whole decoded block, as the base model was trained
  c.data.batch_size = prompts_per_step  # x G rollouts each
  c.ebpo.update(dict(group_size=8, gen_length=GEN, mode="quality", temperature=1.0,
                     editing_threshold=EDITING_THRESHOLD, updates_per_rollout=2, noise=noise))
  return c


def dpo_config(steps: int, lr: float, base: str, pairs: str):
  c = _base_config("dpo", steps, lr)
  c.init_from, c.data.source = base, pairs
  c.data.eos_padding = "block"
  c.data.batch_size = 16
  c.dpo.beta = 0.1
  return c


# ---- data files ---------------------------------------------------------------------------------
def swap_two(answer: str, rng: random.Random) -> str:
  """The answer with two different characters swapped (a plausible wrong answer)."""
  idx = [(i, j) for i in range(len(answer)) for j in range(i + 1, len(answer))
         if answer[i] != answer[j]]
  i, j = rng.choice(idx)
  s = list(answer)
  s[i], s[j] = s[j], s[i]
  return "".join(s)


def write_data(out: str, n: int = 512) -> tuple[str, str, set[str]]:
  """`prompts.jsonl` and `pairs.jsonl` of `n` records each, from disjoint training prompts;
  returns every prompt they hold."""
  examples = toy_tasks.unique_examples(f"{TASK}@train", 3 * n, DATA_SEED)
  examples = [(p, a) for p, a in examples if len(set(a)) > 1][:2 * n]
  rng = random.Random(DATA_SEED)
  prompts, pairs = os.path.join(out, "prompts.jsonl"), os.path.join(out, "pairs.jsonl")
  half = n
  with open(prompts, "w") as f:
    for p, a in examples[:half]:
      f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
  with open(pairs, "w") as f:
    for p, a in examples[half:]:
      f.write(json.dumps({"prompt": p, "chosen": a, "rejected": swap_two(a, rng)}) + "\n")
  return prompts, pairs, {p for p, _ in examples}


# ---- runs ---------------------------------------------------------------------------------------
def run(name: str, cfg, cache: bool = False) -> dict:
  """Trains `cfg` in OUT/name (from scratch; `cache`: reuse a finished run of the same config)
  and returns its metrics rows and export path."""
  from llada_jax.train.trainer import Trainer  # noqa: PLC0415
  work = os.path.join(OUT, name)
  cfg.export_hf = os.path.join(work, "hf")
  stamp = os.path.join(work, "done.json")
  if cache and os.path.exists(stamp):
    with open(stamp) as f:
      done = json.load(f)
    if done["config"] == cfg.to_json_best_effort(sort_keys=True):
      print(f"[{name}] cached in {work}")
      return done["run"]
  shutil.rmtree(work, ignore_errors=True)
  print(f"[{name}] {cfg.stage}: {cfg.steps} steps, lr {cfg.optim.lr}", flush=True)
  t0 = time.perf_counter()
  Trainer(cfg, work, progress=False).run()
  with open(os.path.join(work, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  out = dict(name=name, rows=rows, hf=cfg.export_hf, seconds=time.perf_counter() - t0)
  with open(stamp, "w") as f:
    json.dump(dict(config=cfg.to_json_best_effort(sort_keys=True), run=out), f)
  return out


def evaluate(hf: str, examples, tok) -> dict:
  """Greedy and temperature-1 (4 seeds) accuracy in Quality mode on `examples`."""
  c, params = llada_jax.load_hf_checkpoint(hf)
  kw = dict(gen_length=GEN, block_length=BLOCK, eos_id=tok.eos_id, mask_id=tok.mask_id,
            editing_threshold=EDITING_THRESHOLD)
  greedy = evaluate_setting(params, c, examples, tok, name="greedy", mode="quality", **kw)
  sampled = [evaluate_setting(params, c, examples, tok, name="sampled", mode="quality",
                              temperature=1.0, seed=s, **kw)["accuracy"] for s in range(4)]
  return dict(greedy_accuracy=greedy["accuracy"], sampled_accuracy=float(np.mean(sampled)),
              greedy_tpf=greedy["mean_tpf"])


def window_mean(values, lo: int, hi: int) -> float:
  return float(np.mean(values[lo:hi]))


NOISE_RUNS = {"ebpo": "group", "ebpo_independent": "independent",
              "ebpo_complementary": "complementary"}  # --noise-ablation: the last two


def paired_gain(rows, control_rows, start: int) -> tuple[float, float]:
  """(mean, standard error) over steps >= `start` (1-based) of the step's rollout reward minus
  the lr = 0 control's at the same step (the same prompts and rollout seeds)."""
  a = {r["step"]: r["reward"] for r in rows}
  b = {r["step"]: r["reward"] for r in control_rows}
  d = np.array([a[k] - b[k] for k in sorted(a) if k >= start and k in b], np.float64)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def summarise(runs: dict, evals: dict, meta: dict) -> dict:
  """The tables' numbers: per run, the metric at the start and at the end (10-step means) and,
  for EBPO, the paired gain over the control in the second half of the run."""
  out = {}
  for name, r in runs.items():
    rows = r["rows"]
    key = "reward" if name.startswith("ebpo") else "reward_accuracy"
    vals = [row[key] for row in rows if key in row]
    out[name] = dict(metric=key, first10=window_mean(vals, 0, 10), last10=window_mean(vals, -10,
                                                                                      None),
                     seconds=r["seconds"], **evals.get(name, {}))
    if name.startswith("ebpo"):
      for k in ("clip_fraction_last", "live_last", "ratio_std_last", "response_length"):
        xs = [row[k] for row in rows if k in row]
        out[name][k] = float(np.mean(xs)) if xs else None
      half = len(rows) // 2 + 1
      out[name]["gain_from_step"] = half
      out[name]["gain"], out[name]["gain_se"] = paired_gain(rows, runs["ebpo_lr0"]["rows"], half)
    else:
      xs = [row["margin"] for row in rows]
      out[name]["margin_first10"] = window_mean(xs, 0, 10)
      out[name]["margin_last10"] = window_mean(xs, -10, None)
  return out


def write_markdown(path: str, summary: dict, base_eval: dict, meta: dict) -> None:
  s = summary
  lines = [
      "# Post-training in miniature: EBPO (verifiable reward) and ELBO-DPO (preference pairs)",
      "",
      f"`{' '.join(['python experiments/post_training.py', *meta['argv']])}` "
      f"({hardware_line(meta['hardware'])}; {meta['total_s']:.0f} s in all).",
      "",
      f"Base model: {meta['sft_steps']} SFT steps on `{TASK}@train` ({TASK_TEXT[TASK]}). Data "
      f"files: `prompts.jsonl` ({meta['n_prompts']} prompts with answers), `pairs.jsonl` "
      f"({meta['n_pairs']} pairs: the right answer vs two of its characters swapped). Held-out: "
      f"{meta['n_test']} `{TASK}@test` prompts (none in the data files). Controls: the same run "
      "with lr = 0 (same data order, rollout and noise seeds).",
      "",
      "## EBPO (G = 8, Quality rollouts at temperature 1, T2T off)",
      "",
      f"From the base on `prompts.jsonl` with `reward={REWARD.get(TASK, 'math')}`, "
      f"{meta['rl_prompts']} prompts x 8 rollouts per step, lr {meta['rl_lr']:g}, 2 updates per "
      "rollout, per-block clipped ratios. Gain: the step's rollout reward minus the control's "
      "at the same step (same prompts, same rollout seeds), averaged over the second half of the "
      "run, +- its standard error.",
      "",
      "| run | ebpo.noise | reward, steps 1-10 | reward, last 10 | gain over the control | clip "
      "fraction (2nd update) | live rows (2nd update) | held-out greedy acc. | held-out sampled "
      "acc. |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name in [n for n in (*NOISE_RUNS, "ebpo_lr0") if n in s]:
    r = s[name]
    held = (f"{r['greedy_accuracy']:.3f} | {r['sampled_accuracy']:.3f}" if "greedy_accuracy" in r
            else "- | -")
    gain = (f"{r['gain']:+.3f} +- {r['gain_se']:.3f} (steps {r['gain_from_step']}+)"
            if name != "ebpo_lr0" else "-")
    lines.append(f"| {name} | {NOISE_RUNS.get(name, '-')} | {r['first10']:.3f} | "
                 f"{r['last10']:.3f} | {gain} | {r['clip_fraction_last']:.3f} | "
                 f"{r['live_last']:.2f} | {held} |")
  lines += [
      "",
      "## ELBO-DPO on `pairs.jsonl` (beta 0.1)",
      "",
      "| run | reward accuracy, steps 1-10 | last 10 | margin, steps 1-10 | last 10 | held-out "
      "greedy acc. | held-out sampled acc. |",
      "|---|---|---|---|---|---|---|",
  ]
  for name in ("dpo", "dpo_lr0"):
    r = s[name]
    lines.append(f"| {name} | {r['first10']:.3f} | {r['last10']:.3f} | "
                 f"{r['margin_first10']:.3f} | {r['margin_last10']:.3f} | "
                 f"{r['greedy_accuracy']:.3f} | {r['sampled_accuracy']:.3f} |")
  lines += ["", f"Base model, held out: greedy accuracy {base_eval['greedy_accuracy']:.3f}, "
            f"sampled accuracy {base_eval['sampled_accuracy']:.3f}.", "",
            f"![curves]({meta['stem']}.png)", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def plot(runs: dict, path: str) -> None:
  """Rollout reward per EBPO run and the control, each run's paired gain over the control (the
  per-step difference, cumulative mean from the first step), and DPO's margin."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  def smooth(x, k=5):
    x = np.asarray(x, float)
    return np.convolve(x, np.ones(k) / k, mode="valid") if len(x) >= k else x

  def series(name, key):
    rows = [r for r in runs[name]["rows"] if key in r]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], float)

  colors = {"ebpo": "tab:blue", "ebpo_independent": "tab:orange",
            "ebpo_complementary": "tab:green", "dpo": "tab:blue"}
  ebpo = [n for n in NOISE_RUNS if n in runs]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  def smoothed(ax, name, key):
    steps, ys = series(name, key)
    ys = smooth(ys)
    ax.plot(steps[len(steps) - len(ys):], ys, color=colors.get(name, "tab:gray"),
            label=f"{name} (5-step mean)")

  for name in (*ebpo, "ebpo_lr0"):
    smoothed(axes[0], name, "reward")
  _, control = series("ebpo_lr0", "reward")
  for name in ebpo:
    steps, ys = series(name, "reward")
    n = min(len(ys), len(control))
    gain = np.cumsum(ys[:n] - control[:n]) / np.arange(1, n + 1)
    axes[1].plot(steps[:n], gain, color=colors[name], label=f"{name} - ebpo_lr0")
  axes[1].axhline(0.0, color="tab:gray", lw=0.8)
  for name in ("dpo", "dpo_lr0"):
    smoothed(axes[2], name, "margin")
  titles = ("EBPO: rollout reward", "EBPO: reward minus the control's, mean over steps 1..k",
            "ELBO-DPO: reward margin")
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  global OUT, RESULTS, TASK
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sft-steps", type=int, default=120)
  ap.add_argument("--rl-steps", type=int, default=80)
  ap.add_argument("--dpo-steps", type=int, default=60)
  ap.add_argument("--rl-lr", type=float, default=1e-4)
  ap.add_argument("--dpo-lr", type=float, default=1e-4)
  ap.add_argument("--rl-prompts", type=int, default=16, help="EBPO prompts per step (x 8 "
                  "rollouts)")
  ap.add_argument("--noise-ablation", action="store_true", help="also EBPO with ebpo.noise="
                  "independent and complementary")
  ap.add_argument("--n-test", type=int, default=256)
  ap.add_argument("--base-only", action="store_true", help="train and measure the base model")
  ap.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASK_TEXT))
  ap.add_argument("--workdir", default=None, help="runs and data files (default out/post_training"
                  "[_TASK])")
  ap.add_argument("--results", default=DEFAULT_RESULTS, help="where the tables and the plot go")
  args = ap.parse_args(argv)
  TASK = args.task
  stem = "post_training" if TASK == "bench_sort" else f"post_training_{TASK}"
  OUT, RESULTS = args.workdir or os.path.join(ROOT, "out", stem), args.results
  optional.require_or_exit("matplotlib.pyplot", "the post-training plot")
  os.makedirs(OUT, exist_ok=True)
  os.makedirs(RESULTS, exist_ok=True)
  t0 = time.perf_counter()
  tok = tokenizer()
  prompts, pairs, seen = write_data(OUT)
  examples = toy_tasks.unique_examples(f"{TASK}@test", args.n_test, TEST_SEED)
  if any(p in seen for p, _ in examples):
    raise SystemExit("a held-out prompt is in the data files")
  base = run("base", sft_config(args.sft_steps), cache=True)
  evals = {"base": evaluate(base["hf"], examples, tok)}
  print(f"[base] held out: {evals['base']}", flush=True)
  if args.base_only:
    return 0
  reward = REWARD.get(TASK, "math")
  rl = dict(reward=reward, prompts_per_step=args.rl_prompts)
  ebpo_runs = {n: v for n, v in NOISE_RUNS.items() if n == "ebpo" or args.noise_ablation}
  runs = {
      **{n: run(n, ebpo_config(args.rl_steps, args.rl_lr, base["hf"], prompts, noise=v, **rl))
         for n, v in ebpo_runs.items()},
      "ebpo_lr0": run("ebpo_lr0", ebpo_config(args.rl_steps, 0.0, base["hf"], prompts, **rl)),
      "dpo": run("dpo", dpo_config(args.dpo_steps, args.dpo_lr, base["hf"], pairs)),
      "dpo_lr0": run("dpo_lr0", dpo_config(args.dpo_steps, 0.0, base["hf"], pairs)),
  }
  for name, r in runs.items():
    evals[name] = evaluate(r["hf"], examples, tok)
    print(f"[{name}] held out: {evals[name]}", flush=True)
  meta = dict(hardware=hardware(), stem=stem, rl_prompts=args.rl_prompts,
              argv=list(sys.argv[1:] if argv is None else argv), task=TASK,
              sft_steps=args.sft_steps, rl_steps=args.rl_steps, dpo_steps=args.dpo_steps, rl_lr=args.rl_lr, dpo_lr=args.dpo_lr,
              n_test=len(examples), n_prompts=512, n_pairs=512,
              total_s=time.perf_counter() - t0, base_seconds=base["seconds"])
  summary = summarise(runs, evals, meta)
  with open(os.path.join(RESULTS, f"{stem}.json"), "w") as f:
    json.dump(dict(meta=meta, base=evals["base"], summary=summary,
                   curves={n: r["rows"] for n, r in runs.items()}), f, indent=1)
  write_markdown(os.path.join(RESULTS, f"{stem}.md"), summary, evals["base"], meta)
  plot(runs, os.path.join(RESULTS, f"{stem}.png"))
  print(open(os.path.join(RESULTS, f"{stem}.md")).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
