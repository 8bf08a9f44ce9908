"""LLaDA2.1-flash WSD conversion on a TPU pod."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("flash", "bdlm")
  c.wsd.enabled = True
  c.wsd.stages = ((2000, 4), (2000, 32), (2000, 64), (20000, 4096), (2000, 2048), (2000, 32))
  c.steps = 30000
  return c
