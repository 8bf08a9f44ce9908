"""Checkpoints: Hugging Face safetensors directories (or hub ids) <-> our params pytree, plain or
sharded over a device mesh."""

from llada_jax.checkpoint.hf import (HFTensor, hf_tensor_names, hf_tensor_table,
                                     load_hf_checkpoint, save_hf_checkpoint)
from llada_jax.checkpoint.hub import HUB_PATTERNS, is_hub_id, resolve_checkpoint

__all__ = [
    "HFTensor", "HUB_PATTERNS", "hf_tensor_names", "hf_tensor_table", "is_hub_id",
    "load_hf_checkpoint", "resolve_checkpoint", "save_hf_checkpoint",
]
