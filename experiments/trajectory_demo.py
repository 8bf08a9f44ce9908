"""Draws one decode trajectory of the miniature editing model (HTML page + PNG grid).

  python experiments/trajectory_demo.py [--mode quality|speedy] [--prompt "rev abcd="]
                                        [--model editing|m2t] [--mbe-window 1]

Needs the model of `experiments/paper_in_miniature.py` (`out/miniature/<model>/hf`; trained by
that script). Without `--prompt`, decodes the first 32 held-out test prompts of the benchmark
in one batch and draws the one with the most T2T edits (the first one on ties), so the picture
shows both kinds of update. Writes `experiments/results/trajectory.html` and `trajectory.png`.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llada_jax  # noqa: E402
from llada_jax import optional  # noqa: E402
from experiments import paper_in_miniature as mini  # noqa: E402
from llada_jax import visualize  # noqa: E402
from llada_jax.train import toy_tasks  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="editing", choices=sorted(mini.OBJECTIVES))
  ap.add_argument("--mode", default="quality", choices=("quality", "speedy"))
  ap.add_argument("--threshold", type=float, default=None)
  ap.add_argument("--mbe-window", type=int, default=1)
  ap.add_argument("--prompt", default=None)
  ap.add_argument("--out", default=mini.RESULTS)
  args = ap.parse_args(argv)
  optional.require_or_exit("matplotlib.pyplot", "the trajectory PNG")
  hf = os.path.join(mini.OUT, args.model, "hf")
  if not os.path.exists(os.path.join(hf, "config.json")):
    raise SystemExit(f"no model at {hf}: run experiments/paper_in_miniature.py first")
  config, params = llada_jax.load_hf_checkpoint(hf)
  tok = mini.tokenizer()
  if args.prompt is not None:
    cases = [("prompt", args.prompt, None)]
  else:
    test = mini.test_set(32)
    k = len(mini.TASKS)
    cases = [test[i // k + 32 * (i % k)] for i in range(32)]  # interleave the tasks
  prompts = [tok.encode(p) for _, p, _ in cases]
  result = llada_jax.generate(params, config, prompts, mode=args.mode, trajectory=True,
                              gen_length=mini.GEN, block_length=mini.BLOCK,
                              threshold=args.threshold, mbe_window=args.mbe_window)
  row = max(range(len(cases)), key=lambda i: (result.edits[i], -i))
  task, text, answer = cases[row]
  out = tok.decode(result.output_ids[row])
  verdict = "" if answer is None else (
      f" -> {out!r} ({'right' if toy_tasks.match_any(out, answer) else 'wrong'}; answer "
      f"{answer!r})")
  title = (f"{mini.LABELS[args.model]} model, {args.mode} mode: {text!r}{verdict}")
  os.makedirs(args.out, exist_ok=True)
  html_path = os.path.join(args.out, "trajectory.html")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(visualize.trajectory_html(result, row, tok, prompt=prompts[row], title=title))
  png_path = visualize.trajectory_png(result, row, os.path.join(args.out, "trajectory.png"),
                                      tokenizer=tok, prompt=prompts[row], title=title)
  print(f"{title}\nNFE {result.nfe[row]}, fills {result.fills[row]}, edits "
        f"{result.edits[row]}; wrote {html_path} and {png_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
