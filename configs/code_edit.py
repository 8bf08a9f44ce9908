"""Default code model, stage 3: the LLaDA2.1 mixed objective (M2T drafting + T2T editing).

The T2T stream corrupts 10% of the visible tokens with random ids and trains the model both to
restore them and to keep the clean visible tokens (`keep_weight`): the decoder's editing rule
then changes a drafted token only where the model disagrees with it.
"""

from llada_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.data.kind = "pretrain"
  c.data.name = "stdlib_code"
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.objective.block_length = 32
  c.objective.t_min = 0.1
  c.objective.t_max = 1.0
  c.objective.edit_rate = 0.1  # random-token corruption of unmasked tokens
  c.objective.mtf_rate = 0.0  # MTF self-drafts cost a second forward: off for the CPU budget
  c.objective.edit_weight = 1.0
  c.objective.keep_weight = 1.0
  c.objective.complementary = False
  c.optim.lr = 8e-4
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  c.steps = 1000  # the keep loss (identity at visible tokens) is learnt from scratch here
  c.log_every = 20
  c.ckpt_every = 200
  return c
