"""Tiny EBPO RL with rollouts from our decoder and a char-overlap reward (CPU)."""

from llada_jax.train.defaults import tiny_byte_config


def get_config():
  c = tiny_byte_config("ebpo")
  c.data.task = "repeat"
  c.data.batch_size = 2
  c.ebpo.group_size = 4
  c.ebpo.gen_length = 8
  c.steps = 20
  return c
