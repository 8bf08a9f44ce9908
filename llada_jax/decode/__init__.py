"""Block-diffusion decoding (LLaDA2.0 threshold, LLaDA2.1 M2T + T2T editing)."""

from llada_jax.decode.api import GenerateResult, generate
from llada_jax.decode.settings import MODES, DecodeSettings

__all__ = ["GenerateResult", "generate", "MODES", "DecodeSettings"]
