"""Default code model, stage 2: WSD conversion of the AR model to block diffusion (SPEC 5.1).

Warmup 4 -> 32 -> 64 -> whole sequence (MDLM, 128), then decay back to the target block of 32;
Gaussian noise on masked-token embeddings during the first steps.
"""

from llada_jax.train.defaults import code_model_config


def get_config():
  c = code_model_config("stdlib_code", editing=False)
  c.objective.weighting = "token_mean"
  c.objective.mask_embed_noise = 0.1
  c.noise_steps = 50
  c.wsd.enabled = True
  c.wsd.stages = ((100, 4), (100, 32), (50, 64), (150, 128), (200, 32))
  c.optim.lr = 8e-4
  c.optim.schedule = "wsd"
  c.steps = 600
  c.ckpt_every = 200
  return c
