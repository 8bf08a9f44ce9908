"""`ModelConfig`: the LLaDA2 MoE architecture, mapped to and from Hugging Face `config.json`.

Field names follow the official HF configs (`model_type: llada2_moe`). Two fields are ours:
`param_dtype` (storage dtype of the params) and `dtype` (compute dtype of activations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

from llada_jax.errors import InputError, describe_value

_DTYPES = ("float32", "bfloat16", "float16")

# HF `torch_dtype` spellings accepted for `param_dtype`.
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# What each field allows, for the one-line message naming a bad value.
_POS_INT, _NONNEG_INT, _POS_NUM, _BOOL = ("a positive integer", "a non-negative integer",
                                          "a positive number", "true or false")
_TOKEN_ID = "a token id (an integer in [0, vocab_size))"
_ALLOWED = {
    "vocab_size": _POS_INT, "hidden_size": _POS_INT, "num_hidden_layers": _POS_INT,
    "num_attention_heads": _POS_INT, "intermediate_size": _POS_INT, "num_experts": _POS_INT,
    "num_experts_per_tok": _POS_INT, "moe_intermediate_size": _POS_INT,
    "num_key_value_heads": "a positive integer (or 0: as many as num_attention_heads)",
    "head_dim": "a positive integer (or 0: hidden_size // num_attention_heads)",
    "partial_rotary_factor": "a number in (0, 1]", "rope_theta": _POS_NUM,
    "use_qk_norm": _BOOL, "first_k_dense_replace": _NONNEG_INT,
    "num_shared_experts": _NONNEG_INT, "n_group": _POS_INT, "topk_group": _POS_INT,
    "routed_scaling_factor": _POS_NUM, "rms_norm_eps": _POS_NUM,
    "max_position_embeddings": _POS_INT, "pad_token_id": _TOKEN_ID, "eos_token_id": _TOKEN_ID,
    "mask_token_id": _TOKEN_ID, "use_bias": _BOOL, "use_qkv_bias": _BOOL,
    "tie_word_embeddings": _BOOL, "param_dtype": f"one of {', '.join(_DTYPES)}",
    "dtype": f"one of {', '.join(_DTYPES)}",
}
# Smallest value of the integer fields whose minimum is not 1.
_INT_MIN = {"num_key_value_heads": 0, "head_dim": 0, "first_k_dense_replace": 0,
            "num_shared_experts": 0, "pad_token_id": 0, "eos_token_id": 0, "mask_token_id": 0}

# The LLaDA2 tokenizer's vocabulary and special ids: the only vocabulary for which a config.json
# may leave out pad/eos/mask token ids (the released configs rely on the generate() defaults).
LLADA2_VOCAB_SIZE = 157184
LLADA2_TOKEN_IDS = {"pad_token_id": 156892, "eos_token_id": 156892, "mask_token_id": 156895}


def _bad(msg: str):
  raise InputError(f"invalid model config: {msg}")


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _got(v, kind: str) -> str:
  """The bad value described, with a hint when it is a quoted form of an allowed value."""
  text = describe_value(v)
  if isinstance(v, str):
    try:
      parsed = json.loads(v)
    except ValueError:
      parsed = None
    fits = {"int": _is_int, "float": _is_number, "bool": lambda x: isinstance(x, bool)}
    if kind in fits and fits[kind](parsed):
      text = f"{v!r} (a string; write {v.strip()} without quotes)"
  return text


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
    self._check_types()  # before the defaults below do arithmetic with the values
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

  def _check_types(self) -> None:
    """Raises one `InputError` naming the first field whose value has the wrong type or an
    out-of-range value (a string "1024", "false", NaN, a negative size, ...)."""
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      allowed = _ALLOWED[f.name]
      if f.type == "int":
        ok = _is_int(v) and v >= _INT_MIN.get(f.name, 1)
      elif f.type == "float":
        ok = _is_number(v) and math.isfinite(v) and v > 0
        if f.name == "partial_rotary_factor":
          ok = ok and v <= 1
      elif f.type == "bool":
        ok = isinstance(v, bool)
      else:
        ok = isinstance(v, str) and v in _DTYPES
      if not ok:
        _bad(f"{f.name} must be {allowed}, got {_got(v, f.type)}")

  def validate(self) -> None:
    """Raises one `InputError` (a `ValueError`) naming the first inconsistent field."""
    self._check_types()
    for name in ("num_key_value_heads", "head_dim"):  # after the "0 means default" resolution
      if getattr(self, name) <= 0:
        _bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    bad = _bad
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
    if self.rotary_dim % 2:
      bad(f"rotary dim head_dim*partial_rotary_factor = {self.rotary_dim} must be even")
    if self.use_bias or self.use_qkv_bias:
      bad("use_bias/use_qkv_bias = true is not supported (released LLaDA2 checkpoints set "
          "both to false; the HF config class defaults use_bias to true, so set it explicitly)")
    if self.tie_word_embeddings:
      bad("tie_word_embeddings = true is not supported (LLaDA2 uses an untied lm_head)")
    for name in ("pad_token_id", "eos_token_id", "mask_token_id"):
      v = getattr(self, name)
      if not 0 <= v < self.vocab_size:
        bad(f"{name} ({v!r}) must be a token id in [0, vocab_size={self.vocab_size})")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- HF config.json ------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a parsed HF `config.json`; unknown informational keys are ignored.

    Every field is checked for its type and range (a quoted number or boolean such as
    `"1024"` or `"false"` is rejected, naming the field). `pad_token_id`, `eos_token_id` and
    `mask_token_id` may only be left out with the LLaDA2 vocabulary (`vocab_size` 157184): the
    released configs rely on the LLaDA2 generate() defaults (156892, 156892, 156895), which mean
    nothing for any other vocabulary, so there a missing id is an error naming the field.
    """
    if not isinstance(d, dict):
      _bad("config.json must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
      _bad(f"missing required key(s) {', '.join(missing)}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"param_dtype", "dtype"}
    kw = {k: d[k] for k in fields if k in d and (d[k] is not None or k in _REQUIRED)}
    # The HF config class defaults use_bias to True; keep that meaning for a missing key.
    kw.setdefault("use_bias", True)
    for k in ("eos_token_id", "pad_token_id"):
      if isinstance(kw.get(k), list):  # HF allows a list of EOS ids; the first one is ours
        if not kw[k]:
          _bad(f"{k} must be {_TOKEN_ID} or a non-empty list of them, got []")
        kw[k] = kw[k][0]
    for k, default in LLADA2_TOKEN_IDS.items():
      if k not in kw:
        if d["vocab_size"] != LLADA2_VOCAB_SIZE:
          _bad(f"{k} is missing: it has a default ({default}) only with the LLaDA2 vocabulary "
               f"(vocab_size {LLADA2_VOCAB_SIZE}), and this config has vocab_size "
               f"{d['vocab_size']!r}; add \"{k}\": <token id> to config.json")
        kw[k] = default
    torch_dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
    if not isinstance(torch_dtype, str) or torch_dtype not in _TORCH_DTYPES:
      _bad(f"unsupported torch_dtype {torch_dtype!r} (use one of {', '.join(_TORCH_DTYPES)})")
    kw["param_dtype"] = _TORCH_DTYPES[torch_dtype]
    kw["dtype"] = kw["param_dtype"]
    for k in ("partial_rotary_factor", "rope_theta", "routed_scaling_factor", "rms_norm_eps"):
      if k in kw and _is_number(kw[k]):  # anything else is reported by the type checks
        kw[k] = float(kw[k])
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
    """Reads `path` (a `config.json`, or a directory holding one); a bad file or field raises
    one `InputError` naming the file and the field."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no config.json at {path}")
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise InputError(f"invalid model config: {path} is not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
      raise InputError(f"invalid model config: {path} is not UTF-8 text ({e.reason} at byte "
                       f"{e.start})") from None
    try:
      return cls.from_hf(d)
    except InputError as e:
      msg = str(e)
      prefix = "invalid model config: "
      if msg.startswith(prefix):
        msg = msg[len(prefix):]
      raise InputError(f"invalid model config {path}: {msg}") from None

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
