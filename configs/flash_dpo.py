"""LLaDA2.1-flash ELBO-DPO (TPU pod)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("flash", "dpo")
  c.steps = 2000
  return c
