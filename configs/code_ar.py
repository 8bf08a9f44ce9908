"""Default code model, stage 1: autoregressive pretraining (block length 1) on Python sources.

Run by experiments/train_default_model.py (which sets the corpus, tokenizer and special ids).
"""

from llada_jax.train.defaults import base_config

CODE_MODEL = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=48, intermediate_size=512, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=192, n_group=4, topk_group=2,
                  max_position_embeddings=1024)


def get_config():
  c = base_config()
  c.model.overrides.update(CODE_MODEL)
  c.data.kind = "pretrain"
  c.data.name = "stdlib_code"
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.objective.block_length = 1
  c.objective.t_min = 1.0  # block 1 with every token masked: next-token prediction
  c.objective.t_max = 1.0
  c.optim.lr = 1e-3  # 2e-3 spiked (loss 4.1 -> 5.1 around step 400, batch 8 x 128)
  c.optim.warmup_steps = 50
  c.optim.schedule = "wsd"  # constant, then a linear decay over the last 20% of the steps
  c.steps = 900
  c.log_every = 20
  c.ckpt_every = 300
  return c
