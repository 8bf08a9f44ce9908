"""LLaDA2.x-flash on 256 TPU chips: 16-way expert parallelism (16 experts per chip), 4-way FSDP
over the hidden dim, 4-way tensor parallelism over heads / MLP / vocab; MoE via
ragged_all_to_all with a 2x receive buffer (capacity factor 2: overflow is dropped and
counted; 0 would size it for the worst case, 16x the average load here).
~1.1 GiB of bf16 params per chip (see tools/plan_memory.py)."""

from llada_jax.parallel.mesh import parallel_config


def get_config():
  cfg = parallel_config("data=1,fsdp=4,expert=16,tensor=4")
  cfg.moe.dispatch = "ragged"
  cfg.moe.capacity_factor = 2.0
  return cfg
