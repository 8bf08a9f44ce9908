"""Default code model, stage 4: everyday Python idioms, the LLaDA2.1 mixed objective.

Continues the editing model (`code_edit`) on a mix of generated idiomatic modules
(`experiments/python_idioms.py`: classes, documented functions, small algorithms) and the
standard-library corpus it was trained on, so that the model becomes confident where code is
predictable (block diffusion then fills several tokens per forward) without forgetting the
standard library. Same M2T + T2T objective as `code_edit`.
"""

from llada_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.data.kind = "pretrain"
  c.data.name = "idiom_mix"
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.objective.block_length = 32
  c.objective.t_min = 0.1
  c.objective.t_max = 1.0
  c.objective.edit_rate = 0.1
  c.objective.mtf_rate = 0.0
  c.objective.edit_weight = 1.0
  c.objective.keep_weight = 1.0
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  c.steps = 3000
  c.log_every = 20
  c.ckpt_every = 500
  return c
