"""Tiny ELBO-DPO on a toy task (CPU): the right answer vs another example's answer. `repeat`
(`rep x=` -> `xxxxxxxx`) is learnable from a random init in the default 30 steps (the reward
margin rises from ~0 to ~2); on preference data: --config.data.task= --config.data.source=PAIRS.jsonl
(`{"prompt", "chosen", "rejected"}` records, or chat `messages`).
"""

from llada_jax.train.defaults import tiny_byte_config


def get_config():
  c = tiny_byte_config("dpo")
  c.data.task = "repeat"
  c.dpo.beta = 0.1
  c.steps = 30
  return c
