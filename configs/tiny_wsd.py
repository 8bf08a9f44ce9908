"""Tiny WSD conversion: blocks 1 -> 4 -> 32 (MDLM) -> 16 -> 8 (CPU)."""

from llada_jax.train.defaults import tiny_byte_config


def get_config():
  c = tiny_byte_config()
  c.wsd.enabled = True
  c.wsd.stages = ((10, 1), (10, 4), (10, 32), (10, 16), (10, 8))
  c.steps = 50
  c.objective.mask_embed_noise = 0.1
  c.noise_steps = 10
  return c
