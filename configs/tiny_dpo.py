"""Tiny ELBO-DPO on a toy task: right answer vs another example's answer (CPU)."""

from llada_jax.train.defaults import tiny_byte_config


def get_config():
  c = tiny_byte_config("dpo")
  c.dpo.beta = 0.1
  c.steps = 30
  return c
