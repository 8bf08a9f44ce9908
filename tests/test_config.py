"""ModelConfig: HF config.json round trip, presets and validation."""

import json

import pytest

from llada_jax.config import PRESETS, ModelConfig, get_preset, tiny_config


def test_fixture_config_round_trip(gold, tmp_path):
  c = gold.config
  assert c.num_dense_layers == 1 and c.num_moe_layers == 2
  assert c.rotary_dim == 8 and c.head_dim == 16
  path = tmp_path / "config.json"
  c.to_json_file(path)
  assert ModelConfig.from_json_file(path) == c
  with open(path) as f:
    d = json.load(f)
  assert d["model_type"] == "llada2_moe" and d["torch_dtype"] == "float32"
  with open(f"{gold.dir}/config.json") as f:
    official = json.load(f)
  for k in ("hidden_size", "num_experts", "n_group", "topk_group", "num_key_value_heads",
            "partial_rotary_factor", "rope_theta", "mask_token_id", "eos_token_id"):
    assert d[k] == official[k], k


def test_presets():
  mini, flash = get_preset("llada2_0_mini"), get_preset("llada2_1_flash")
  assert (mini.num_hidden_layers, mini.hidden_size, mini.num_experts) == (20, 2048, 256)
  assert (flash.num_hidden_layers, flash.hidden_size, flash.moe_intermediate_size) == (32, 4096,
                                                                                        1024)
  assert mini.rotary_dim == 64 and mini.mask_token_id == 156895
  assert set(PRESETS) >= {"llada2_0_mini", "llada2_0_flash", "llada2_1_mini",
                          "llada2_1_flash", "tiny"}
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("gpt")


def test_kv_heads_zero_means_all_heads():
  assert tiny_config(num_key_value_heads=0).num_key_value_heads == 4


def test_unknown_keys_tolerated():
  d = tiny_config().to_hf()
  d["some_future_key"] = 3
  assert ModelConfig.from_hf(d) == tiny_config()


@pytest.mark.parametrize("change, msg", [
    (dict(num_key_value_heads=3), "not divisible by num_key_value_heads"),
    (dict(n_group=3), "does not divide num_experts"),
    (dict(topk_group=5), "exceeds n_group"),
    (dict(num_experts_per_tok=9), "exceeds num_experts"),
    (dict(hidden_size=-1), "hidden_size must be a positive integer"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(use_bias=True), "use_bias"),
    (dict(mask_token_id=9999), "mask_token_id"),
    (dict(torch_dtype="int8"), "unsupported torch_dtype"),
    (dict(rope_theta="big"), "rope_theta must be a positive number, got .big. \\(a string\\)"),
    (dict(max_position_embeddings="1024"), "max_position_embeddings must be a positive integer"),
    (dict(use_qk_norm="false"), "use_qk_norm must be true or false, got 'false'"),
])
def test_invalid_values(change, msg):
  d = tiny_config().to_hf()
  d.update(change)
  with pytest.raises(ValueError, match=msg):
    ModelConfig.from_hf(d)


def test_missing_required_key_and_use_bias_default():
  d = tiny_config().to_hf()
  del d["num_experts"]
  with pytest.raises(ValueError, match="missing required key.*num_experts"):
    ModelConfig.from_hf(d)
  d = tiny_config().to_hf()
  del d["use_bias"]  # the HF class defaults it to true, which we do not support
  with pytest.raises(ValueError, match="use_bias"):
    ModelConfig.from_hf(d)


def test_bad_json(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ModelConfig.from_json_file(tmp_path)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    ModelConfig.from_json_file(tmp_path / "nowhere")
