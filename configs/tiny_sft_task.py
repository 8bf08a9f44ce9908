"""Tiny SFT with the editing objective on a toy task (CPU smoke run)."""

from llada_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 264
  c.model.overrides.pad_token_id = 257
  c.model.overrides.eos_token_id = 256
  c.model.overrides.mask_token_id = 258
  c.data.task = "addition"
  c.data.seq_len = 32
  c.data.batch_size = 16
  c.objective.block_length = 8
  c.objective.edit_rate = 0.1
  c.steps = 60
  c.log_every = 10
  c.ckpt_every = 20
  return c
