"""LLaDA2.1-flash EBPO RL (TPU pod)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("flash", "ebpo")
  c.ebpo.gen_length = 512
  c.steps = 500
  return c
