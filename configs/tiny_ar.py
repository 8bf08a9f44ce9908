"""Tiny AR pretraining (block length 1, every token masked) on a toy task (CPU)."""

from llada_jax.train.defaults import tiny_byte_config


def get_config():
  c = tiny_byte_config()
  c.objective.block_length = 1
  c.objective.t_min = 1.0
  c.objective.t_max = 1.0
  return c
