"""`ModelConfig`: the LLaDA2 MoE architecture, mapped to and from Hugging Face `config.json`.

Field names follow the official HF configs (`model_type: llada2_moe`). Two fields are ours:
`param_dtype` (storage dtype of the params) and `dtype` (compute dtype of activations).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")

# HF `torch_dtype` spellings accepted for `param_dtype`.
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architecture field of a LLaDA2 MoE model (SPEC 1.1, 1.2)."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  num_experts: int
  num_experts_per_tok: int
  moe_intermediate_size: int
  num_key_value_heads: int = 0  # 0 means "= num_attention_heads" (LLaDA2.1 config class).
  head_dim: int = 0  # 0 means hidden_size // num_attention_heads.
  partial_rotary_factor: float = 0.5
  rope_theta: float = 600000.0
  use_qk_norm: bool = True
  first_k_dense_replace: int = 1
  num_shared_experts: int = 1
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 2.5
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  pad_token_id: int = 156892
  eos_token_id: int = 156892
  mask_token_id: int = 156895
  use_bias: bool = False
  use_qkv_bias: bool = False
  tie_word_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    # Resolve the "0 means default" fields once, so every reader sees concrete values.
    if self.num_key_value_heads == 0:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim == 0 and self.num_attention_heads > 0:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    self.validate()

  # ---- derived sizes -------------------------------------------------------------------------
  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def num_dense_layers(self) -> int:
    return min(self.first_k_dense_replace, self.num_hidden_layers)

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.num_dense_layers

  @property
  def shared_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.num_shared_experts

  def validate(self) -> None:
    """Raises one `ValueError` naming the first inconsistent field."""
    def bad(msg):
      raise ValueError(f"invalid model config: {msg}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "intermediate_size", "n_group", "topk_group"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        bad(f"{name} must be a positive integer, got {v!r}")
    for name in ("first_k_dense_replace", "num_shared_experts"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        bad(f"{name} must be a non-negative integer, got {v!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      bad(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
          f"num_key_value_heads ({self.num_key_value_heads})")
    if self.num_experts % self.n_group:
      bad(f"n_group ({self.n_group}) does not divide num_experts ({self.num_experts})")
    if self.topk_group > self.n_group:
      bad(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
    if self.num_experts_per_tok > self.num_experts:
      bad(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
          f"({self.num_experts})")
    if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
      bad(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the "
          f"{self.topk_group} kept groups")
    if self.num_experts // self.n_group < 2:
      bad("each routing group needs at least 2 experts (group score = sum of the top 2)")
    if not 0.0 < self.partial_rotary_factor <= 1.0:
      bad(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
    if self.rotary_dim % 2:
      bad(f"rotary dim head_dim*partial_rotary_factor = {self.rotary_dim} must be even")
    if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
      bad("rope_theta and rms_norm_eps must be positive")
    if self.use_bias or self.use_qkv_bias:
      bad("use_bias/use_qkv_bias = true is not supported (released LLaDA2 checkpoints set "
          "both to false; the HF config class defaults use_bias to true, so set it explicitly)")
    if self.tie_word_embeddings:
      bad("tie_word_embeddings = true is not supported (LLaDA2 uses an untied lm_head)")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        bad(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
    for name in ("pad_token_id", "eos_token_id", "mask_token_id"):
      v = getattr(self, name)
      if not isinstance(v, int) or not 0 <= v < self.vocab_size:
        bad(f"{name} ({v!r}) must be a token id in [0, vocab_size={self.vocab_size})")
    if self.max_position_embeddings <= 0:
      bad("max_position_embeddings must be positive")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- HF config.json ------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a parsed HF `config.json`; unknown informational keys are ignored."""
    if not isinstance(d, dict):
      raise ValueError("invalid model config: config.json must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
      raise ValueError(f"invalid model config: missing required key(s) {', '.join(missing)}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"param_dtype", "dtype"}
    kw = {k: d[k] for k in fields if k in d and d[k] is not None}
    # The HF config class defaults use_bias to True; keep that meaning for a missing key.
    kw.setdefault("use_bias", True)
    for k in ("eos_token_id", "pad_token_id"):
      if isinstance(kw.get(k), list):
        kw[k] = kw[k][0]
    if "mask_token_id" not in kw:
      kw["mask_token_id"] = d.get("mask_token_id", cls.mask_token_id)
    torch_dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
    if torch_dtype not in _TORCH_DTYPES:
      raise ValueError(f"invalid model config: unsupported torch_dtype {torch_dtype!r}")
    kw["param_dtype"] = _TORCH_DTYPES[torch_dtype]
    kw["dtype"] = kw["param_dtype"]
    for k, v in kw.items():
      if k in ("partial_rotary_factor", "rope_theta", "routed_scaling_factor", "rms_norm_eps"):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
          raise ValueError(f"invalid model config: {k} must be a number, got {v!r}")
        kw[k] = float(v)
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict (official field names and fixed informational keys)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d.pop("dtype")
    d["torch_dtype"] = d.pop("param_dtype")
    d.update({
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "hidden_act": "silu",
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "norm_topk_prob": True,
        "router_dtype": "fp32",
        "rope_scaling": None,
        "rotary_dim": self.rotary_dim,
        "use_sliding_window": False,
        "use_cache": False,
    })
    return dict(sorted(d.items()))

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no config.json at {path}")
    try:
      with open(path) as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"invalid model config: {path} is not valid JSON ({e})") from None
    return cls.from_hf(d)

  def to_json_file(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_hf(), f, indent=2)
      f.write("\n")


def _llada2(layers, hidden, heads, intermediate, moe_intermediate, **kw) -> ModelConfig:
  return ModelConfig(
      vocab_size=157184, hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=4, head_dim=128,
      partial_rotary_factor=0.5, rope_theta=600000.0, intermediate_size=intermediate,
      first_k_dense_replace=1, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
      moe_intermediate_size=moe_intermediate, n_group=8, topk_group=4,
      routed_scaling_factor=2.5, rms_norm_eps=1e-6, max_position_embeddings=32768,
      pad_token_id=156892, eos_token_id=156892, mask_token_id=156895,
      param_dtype="bfloat16", dtype="bfloat16", **kw)


def tiny_config(**overrides) -> ModelConfig:
  """A few-hundred-kilobyte config for tests: 3 layers (1 dense), 8 experts in 4 groups."""
  base = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128, num_experts=8,
              num_experts_per_tok=2, moe_intermediate_size=32, n_group=4, topk_group=2,
              max_position_embeddings=512, pad_token_id=510, eos_token_id=510,
              mask_token_id=511)
  base.update(overrides)
  return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "llada2_0_mini": _llada2(20, 2048, 16, 5120, 512),
    "llada2_0_flash": _llada2(32, 4096, 32, 9216, 1024),
    # SPEC 1.2: the 2.1 configs were not found; same architecture as 2.0.
    "llada2_1_mini": _llada2(20, 2048, 16, 5120, 512),
    "llada2_1_flash": _llada2(32, 4096, 32, 9216, 1024),
    "tiny": tiny_config(),
}


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name]
