"""LLaDA2.1-mini WSD conversion on a TPU pod (init_from an AR/HF checkpoint)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("mini", "bdlm")
  c.wsd.enabled = True
  c.wsd.stages = ((2000, 4), (2000, 32), (2000, 64), (20000, 4096), (2000, 2048), (2000, 32))
  c.steps = 30000
  c.noise_steps = 500
  c.objective.mask_embed_noise = 0.05
  return c
