"""LLaDA2.1-mini EBPO RL (TPU pod)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("mini", "ebpo")
  c.ebpo.group_size = 8
  c.ebpo.gen_length = 512
  c.steps = 500
  return c
