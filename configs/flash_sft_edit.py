"""LLaDA2.1-flash SFT with the editing objective (TPU pod)."""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("flash", "bdlm")
  c.data.kind = "sft"
  c.data.seq_len = 2048
  c.data.block_padding = True  # lengths padded to a multiple of the block, the padding trained
  c.data.pack = False  # True: several examples per row (grain first-fit packing)
  c.objective.complementary = True
  c.objective.edit_rate = 0.1
  c.steps = 10000
  return c
