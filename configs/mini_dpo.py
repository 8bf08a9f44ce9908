"""LLaDA2.1-mini ELBO-DPO (TPU pod; data.task or a preference corpus)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("mini", "dpo")
  c.dpo.beta = 0.1
  c.steps = 2000
  return c
