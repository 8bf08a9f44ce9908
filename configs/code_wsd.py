"""Default code model, stage 2: WSD conversion of the AR model to block diffusion (SPEC 5.1).

Warmup 4 -> 32 -> 64 -> whole sequence (MDLM, 128), then decay back to the target block of 32;
Gaussian noise on masked-token embeddings during the first steps.
"""

from llada_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.data.kind = "pretrain"
  c.data.name = "stdlib_code"
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.objective.block_length = 32
  c.objective.weighting = "token_mean"
  c.objective.t_min = 0.1
  c.objective.t_max = 1.0
  c.objective.mask_embed_noise = 0.1
  c.noise_steps = 50
  c.wsd.enabled = True
  c.wsd.stages = ((100, 4), (100, 32), (50, 64), (150, 128), (200, 32))
  c.optim.lr = 8e-4
  c.optim.warmup_steps = 20
  c.optim.schedule = "wsd"
  c.steps = 600
  c.log_every = 20
  c.ckpt_every = 200
  return c
