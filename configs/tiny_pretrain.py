"""Tiny block-diffusion pretraining on a text corpus (CPU). Set --config.data.source=PATH."""

from llada_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.model.overrides.vocab_size = 264  # byte tokenizer: 256 bytes + eos 256, pad 257, mask 258
  c.model.overrides.pad_token_id = 257
  c.model.overrides.eos_token_id = 256
  c.model.overrides.mask_token_id = 258
  c.data.source = ""
  c.data.kind = "pretrain"
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.objective.block_length = 16
  c.steps = 100
  c.log_every = 10
  c.ckpt_every = 50
  return c
