"""LLaDA2.1-flash-size AR stage (block 1) of the conversion recipe (TPU pod)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("flash", "bdlm")
  c.objective.block_length = 1
  c.objective.t_min = 1.0
  c.objective.t_max = 1.0
  c.steps = 10000
  return c
