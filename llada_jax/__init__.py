"""llada_jax: the LLaDA2.x block-diffusion MoE language models in JAX/Flax."""

from llada_jax.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from llada_jax.config import PRESETS, ModelConfig, get_preset, tiny_config
from llada_jax.decode import DecodeSettings, GenerateResult, generate
from llada_jax.llm import LLM, Completion
from llada_jax.model.params import count_params, init_params, param_shapes
from llada_jax.model.transformer import forward

__all__ = [
    "Completion", "DecodeSettings", "GenerateResult", "LLM", "ModelConfig", "PRESETS", "count_params", "forward",
    "generate", "get_preset", "init_params", "load_hf_checkpoint", "param_shapes",
    "save_hf_checkpoint", "tiny_config",
]
__version__ = "0.1.0"
