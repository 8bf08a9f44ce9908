"""Default code model, stage 4: everyday Python idioms, the LLaDA2.1 mixed objective.

Continues the editing model (`code_edit`) on a mix of generated idiomatic modules
(`experiments/python_idioms.py`: classes, documented functions, small algorithms) and the
standard-library corpus it was trained on, so that the model becomes confident where code is
predictable (block diffusion then fills several tokens per forward) without forgetting the
standard library. Same M2T + T2T objective as `code_edit`.
"""

from llada_jax.train.defaults import code_model_config


def get_config():
  c = code_model_config("idiom_mix")
  c.optim.lr = 6e-4
  c.steps = 3000
  c.ckpt_every = 500
  return c
