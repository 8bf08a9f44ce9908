"""Tiny EBPO RL on a toy task (CPU): G = 8 rollouts per prompt from our decoder, rewarded by
character overlap with the answer, per-block clipped ratios.

RL learns from a policy that sometimes succeeds: start from a briefly trained model, e.g.
  python -m llada_jax.train --config configs/tiny_sft_task.py --config.data.task=repeat \
      --config.steps=40 --config.export_hf=W0/hf --workdir W0
  python -m llada_jax.train --config configs/tiny_ebpo.py --config.init_from=W0/hf --workdir W
On a prompt set: --config.data.task= --config.data.source=PROMPTS.jsonl --config.reward=math
(`{"prompt", "answer"}` records; `code` runs `{"prompt", "tests"}` records in a sandbox).
"""

from llada_jax.train.defaults import tiny_byte_config


def get_config():
  c = tiny_byte_config("ebpo")
  c.data.task = "repeat"
  c.data.batch_size = 4  # prompts per step (x group_size rollouts)
  c.ebpo.group_size = 8
  c.ebpo.gen_length = 8
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.steps = 20
  return c
