"""Runs the official LLaDA2 `generate` (the HF remote code) and prints what it did as JSON.

This script runs in a *reference environment* (PyTorch + transformers 4.5x), not in ours: it
imports neither jax nor llada_jax. `tools/bench_decode.py --reference-python PY
--reference-code DIR` starts it to time the official decoder side by side with ours on the same
checkpoint. Setting up that environment (tests never need it):

  python -m venv ref && ref/bin/pip install torch "transformers==4.57.*" safetensors
  # the official remote code of an LLaDA2 checkpoint (modeling_llada2_moe.py and
  # configuration_llada2_moe.py), e.g.:
  huggingface-cli download inclusionAI/LLaDA2.0-mini --include "*.py" --local-dir refcode

  python tools/reference_generate.py --checkpoint DIR --prompt-ids IDS.json [--gen-length 256]
      [--block-length 32] [--steps 32] [--threshold 0.95] [--threads 2]

DIR is an HF checkpoint directory whose config.json maps AutoModelForCausalLM to the remote
code (`auto_map`); bench_decode.py lays one out. Output (stdout, one JSON object): the output ids
(generated tokens only), the number of forwards (NFE) and the wall time of `generate` (the
best of `--repeats`, after `--warmup` untimed runs: eager PyTorch compiles nothing).

The official `generate` builds its block mask in bfloat16, which a float32 model's attention
refuses; the model's forward is wrapped to cast that mask to the model's dtype (values 0 / -inf
unchanged) and to count forwards. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--prompt-ids", required=True, help="a JSON file: a list of token ids")
  p.add_argument("--gen-length", type=int, default=256)
  p.add_argument("--block-length", type=int, default=32)
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--threshold", type=float, default=0.95)
  p.add_argument("--eos-id", type=int, required=True)
  p.add_argument("--mask-id", type=int, required=True)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=1, help="timed runs (the best is reported)")
  p.add_argument("--warmup", type=int, default=0, help="untimed runs first")
  args = p.parse_args(argv)

  import torch  # noqa: PLC0415 (the reference environment's)
  from transformers import AutoModelForCausalLM  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  model = AutoModelForCausalLM.from_pretrained(
      args.checkpoint, trust_remote_code=True, torch_dtype=torch.float32).eval()
  forward = model.forward
  nfe = [0]

  def counted(*a, attention_mask=None, **k):
    nfe[0] += 1
    if attention_mask is not None and attention_mask.is_floating_point():
      attention_mask = attention_mask.to(model.dtype)
    return forward(*a, attention_mask=attention_mask, **k)

  model.forward = counted
  with open(args.prompt_ids) as f:
    prompt = torch.tensor([json.load(f)], dtype=torch.long)
  kw = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
            threshold=args.threshold, temperature=0.0, eos_early_stop=False,
            eos_id=args.eos_id, mask_id=args.mask_id)
  best = float("inf")
  for i in range(args.warmup + args.repeats):
    nfe[0] = 0
    t0 = time.perf_counter()
    with torch.no_grad():
      out = model.generate(prompt, **kw)
    if i >= args.warmup:
      best = min(best, time.perf_counter() - t0)
  ids = out[0, prompt.shape[1]:].tolist()
  json.dump({"output_ids": ids, "nfe": nfe[0], "seconds": best,
             "torch": torch.__version__, "threads": torch.get_num_threads()}, sys.stdout)
  print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
