"""LLaDA2.x-flash on 64 TPU chips: expert=8 (32 experts per chip), fsdp=2, tensor=4; MoE via
ragged_all_to_all with a 2x receive buffer (capacity factor 2: overflow is dropped and
counted). ~3.7 GiB of bf16 params per chip (see tools/plan_memory.py)."""

from llada_jax.parallel.mesh import parallel_config


def get_config():
  cfg = parallel_config("fsdp=2,expert=8,tensor=4")
  cfg.moe.dispatch = "ragged"
  cfg.moe.capacity_factor = 2.0
  return cfg
