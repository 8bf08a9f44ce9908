"""Pallas TPU kernels (interpret mode on other backends). Importing this package registers:

  attention_impl="pallas"      block-diffusion flash attention (`block_diffusion_attention`),
                               interpret mode unless the default backend is TPU;
  update_impl="pallas"         the fused mask-fill/edit step (`fused_update_counts`), likewise;
  sampler_impl="pallas"        greedy sampling fused with the LM head (`greedy_head`), likewise
                               ("pallas_tpu": always Mosaic, as below);
  attention_impl / update_impl="pallas_tpu"
                               the same kernels always lowered with Mosaic (never interpreted):
                               for `jax.export(..., platforms=("tpu",))` from a CPU/GPU host.

`attention_impl="auto"` (the model's registry, `model.transformer.resolve_attention`) stands for
"pallas_tpu" on a TPU backend and "xla" elsewhere; "pallas" away from TPU warns once that it
runs the interpreter. Under a multi-device mesh the attention kernel runs inside `shard_map`
(`shard_attention`: batch over data/fsdp/expert, heads over tensor).

The kernel modules import nothing from `llada_jax.model`; only the registration below does.
"""

from llada_jax.decode.update import register_update
from llada_jax.kernels.block_attention import (BlockSizes, block_diffusion_attention,
                                               classify_tiles, default_interpret, make_plan,
                                               pallas_attention, pallas_tpu_attention, tile_kinds,
                                               visible_ids)
from llada_jax.decode.update import register_sampler
from llada_jax.kernels.fused_sampler import greedy_head, pallas_sampler, pallas_tpu_sampler
from llada_jax.kernels.fused_update import fused_update_counts, pallas_tpu_update, pallas_update
from llada_jax.kernels.sharded_attention import AttentionSharding, plan_sharding, shard_attention
from llada_jax.model.transformer import register_attention

register_attention("pallas", pallas_attention)
register_attention("pallas_tpu", pallas_tpu_attention)
register_update("pallas", pallas_update)
register_update("pallas_tpu", pallas_tpu_update)
register_sampler("pallas", pallas_sampler)
register_sampler("pallas_tpu", pallas_tpu_sampler)

__all__ = [
    "AttentionSharding", "BlockSizes", "block_diffusion_attention", "classify_tiles",
    "default_interpret", "fused_update_counts", "make_plan", "pallas_attention",
    "pallas_tpu_attention", "pallas_tpu_update", "pallas_update", "plan_sharding",
    "shard_attention", "tile_kinds", "visible_ids",
]
__all__ += ["greedy_head", "pallas_sampler", "pallas_tpu_sampler"]
