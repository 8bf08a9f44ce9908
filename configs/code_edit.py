"""Default code model, stage 3: the LLaDA2.1 mixed objective (M2T drafting + T2T editing).

The T2T stream corrupts 10% of the visible tokens with random ids and trains the model both to
restore them and to keep the clean visible tokens (`keep_weight`): the decoder's editing rule
then changes a drafted token only where the model disagrees with it.
"""

from llada_jax.train.defaults import code_model_config


def get_config():
  c = code_model_config("stdlib_code")  # the T2T stream: 10% of the visible tokens corrupted
  c.optim.lr = 8e-4
  c.steps = 1000  # the keep loss (identity at visible tokens) is learnt from scratch here
  c.ckpt_every = 200
  return c
