"""HF checkpoint loading/saving: name mapping, round trips, sharding, bf16, and error messages."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from llada_jax.checkpoint import hf
from llada_jax.checkpoint.hf import hf_tensor_names, load_hf_checkpoint, save_hf_checkpoint
from llada_jax.config import ModelConfig
from llada_jax.model.params import param_shapes

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DIRS = [os.path.join(FIXTURES, n) for n in ("llada2_tiny", "llada2_tiny_groups")]
TINY = DIRS[0]
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module", params=DIRS, ids=os.path.basename)
def loaded(request):
  """(fixture dir, config, params, raw tensors by HF name) for each fixture checkpoint."""
  config, params = load_hf_checkpoint(request.param)
  raw = load_file(os.path.join(request.param, "model.safetensors"))
  return request.param, config, params, raw


def _leaves(params):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _copy(tmp_path, src=TINY):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _rewrite_weights(ckpt, edit):
  """Applies `edit` (dict of HF name -> array, edited in place) to `ckpt/model.safetensors`."""
  file = os.path.join(ckpt, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def _rewrite_config(ckpt, edit):
  file = os.path.join(ckpt, "config.json")
  with open(file) as f:
    d = json.load(f)
  edit(d)
  with open(file, "w") as f:
    json.dump(d, f)


def _error_message(exc_type, ckpt):
  with pytest.raises(exc_type) as e:
    load_hf_checkpoint(ckpt)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


# ---- loading the fixtures --------------------------------------------------------------------
def test_names_match_fixture(loaded):
  _, config, _, raw = loaded
  assert hf_tensor_names(config) == {k: v.shape for k, v in raw.items()}


def test_shapes_and_dtypes(loaded):
  _, config, params, _ = loaded
  assert config == ModelConfig.from_json_file(loaded[0])
  want = param_shapes(config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
  for got, spec in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
    assert got.shape == spec.shape and got.dtype == spec.dtype == jnp.float32


def test_spot_checks_against_raw(loaded):
  _, c, p, raw = loaded
  k = c.first_k_dense_replace
  last = c.num_hidden_layers - 1
  e = c.num_experts - 1
  np.testing.assert_array_equal(p["embed"], raw["model.word_embeddings.weight"])
  np.testing.assert_array_equal(p["lm_head"], raw["lm_head.weight"].T)
  np.testing.assert_array_equal(p["final_norm"], raw["model.norm.weight"])
  np.testing.assert_array_equal(p["dense"]["attn"]["qkv"][0],
                                raw["model.layers.0.attention.query_key_value.weight"].T)
  np.testing.assert_array_equal(p["dense"]["mlp"]["down"][0],
                                raw["model.layers.0.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(p["moe"]["experts"]["gate"][last - k, e],
                                raw[f"model.layers.{last}.mlp.experts.{e}.gate_proj.weight"].T)
  np.testing.assert_array_equal(p["moe"]["experts"]["down"][0, 1],
                                raw[f"model.layers.{k}.mlp.experts.1.down_proj.weight"].T)
  np.testing.assert_array_equal(p["moe"]["router"]["weight"][last - k],
                                raw[f"model.layers.{last}.mlp.gate.weight"].T)
  np.testing.assert_array_equal(p["moe"]["router"]["expert_bias"][0],
                                raw[f"model.layers.{k}.mlp.gate.expert_bias"])
  np.testing.assert_array_equal(p["moe"]["shared"]["up"][0],
                                raw[f"model.layers.{k}.mlp.shared_experts.up_proj.weight"].T)
  np.testing.assert_array_equal(p["moe"]["attn"]["k_norm"][last - k],
                                raw[f"model.layers.{last}.attention.key_layernorm.weight"])
  np.testing.assert_array_equal(p["moe"]["post_norm"][0],
                                raw[f"model.layers.{k}.post_attention_layernorm.weight"])


def test_every_tensor_lands_in_its_slice(loaded):
  _, c, p, raw = loaded
  seen = {}
  for t in hf.hf_tensor_table(c):
    leaf = np.asarray(hf._get(p, t.path))[t.index]
    np.testing.assert_array_equal(leaf, raw[t.name].T if t.transpose else raw[t.name])
    seen.setdefault(t.path, set()).add(t.index)
  for path, idx in seen.items():  # every slice of every leaf is covered exactly once
    shape = np.shape(hf._get(p, path))[:len(next(iter(idx)))]
    assert len(idx) == int(np.prod(shape)), path


def test_load_as_bfloat16(loaded):
  d, _, p32, _ = loaded
  c, p = load_hf_checkpoint(d, dtype="bfloat16")
  assert c.param_dtype == c.dtype == "bfloat16"
  for key, x in _leaves(p).items():
    router = "router" in key
    assert x.dtype == (np.float32 if router else BF16), key
    want = _leaves(p32)[key]
    np.testing.assert_array_equal(x, want if router else want.astype(BF16))


# ---- saving ----------------------------------------------------------------------------------
def test_fp32_round_trip_is_bit_identical(loaded, tmp_path):
  d, c, p, raw = loaded
  save_hf_checkpoint(tmp_path / "out", c, p)
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
  umask = os.umask(0)
  os.umask(umask)
  for name in ("config.json", "model.safetensors"):  # the mode `open` gives, not owner-only
    assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o666 & ~umask, name
  c2, p2 = load_hf_checkpoint(tmp_path / "out")
  assert c2 == c
  a, b = _leaves(p), _leaves(p2)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  saved = load_file(tmp_path / "out" / "model.safetensors")
  assert saved.keys() == raw.keys()
  for k in raw:
    assert saved[k].dtype == raw[k].dtype and saved[k].tobytes() == raw[k].tobytes(), k
  with safe_open(tmp_path / "out" / "model.safetensors", "numpy") as f:
    assert f.metadata() == {"format": "pt"}


def _two_shard_limit(c):
  """A max_shard_bytes that splits the bf16 checkpoint of `c` into exactly two shards."""
  sizes = [hf._tensor_bytes(c, t) for t in hf.hf_tensor_table(c)]
  limit = (sum(sizes) + 1) // 2 + max(sizes)
  assert limit < sum(sizes)
  return limit, sum(sizes)


def test_bf16_sharded_round_trip(loaded, tmp_path):
  d, c, p, _ = loaded
  out = tmp_path / "bf16"
  limit, total = _two_shard_limit(c.replace(param_dtype="bfloat16"))
  save_hf_checkpoint(out, c, p, max_shard_bytes=limit, dtype="bfloat16")
  shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
  assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors.index.json"] + shards)
  with open(out / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert index["metadata"]["total_size"] == total
  assert set(index["weight_map"]) == set(hf_tensor_names(c))
  assert set(index["weight_map"].values()) == set(shards)
  with open(out / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  for s in shards:
    with safe_open(out / s, "numpy") as f:
      nbytes = 0
      for name in f.keys():
        want = "F32" if ".mlp.gate." in name else "BF16"
        assert f.get_slice(name).get_dtype() == want, name
        nbytes += f.get_tensor(name).nbytes
      assert nbytes <= limit

  c2, p2 = load_hf_checkpoint(out)
  assert c2 == c.replace(param_dtype="bfloat16", dtype="bfloat16")
  a, b = _leaves(p), _leaves(p2)
  for k in a:
    want = a[k] if "router" in k else a[k].astype(BF16)
    assert b[k].dtype == want.dtype and b[k].tobytes() == want.tobytes(), k

  _, p3 = load_hf_checkpoint(out, dtype="float32")  # bf16 -> fp32 is an exact upcast
  for k, x in _leaves(p3).items():
    assert x.dtype == np.float32
    assert x.tobytes() == b[k].astype(np.float32).tobytes(), k


def test_save_over_existing_is_clean(tmp_path):
  c, p = load_hf_checkpoint(TINY)
  out = tmp_path / "ckpt"
  limit, _ = _two_shard_limit(c)
  save_hf_checkpoint(out, c, p, max_shard_bytes=limit)
  (out / "tokenizer.json").write_text("{}")
  assert "model.safetensors.index.json" in os.listdir(out)
  save_hf_checkpoint(out, c, p)  # single file now: the old shards and index must go
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert os.listdir(tmp_path) == ["ckpt"]  # no temp or backup directory left behind
  c2, p2 = load_hf_checkpoint(out)
  assert c2 == c
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(p),
                                                  jax.tree_util.tree_leaves(p2)))


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
  c, p = load_hf_checkpoint(TINY)
  out = tmp_path / "ckpt"
  save_hf_checkpoint(out, c, p)
  before = (out / "model.safetensors").read_bytes()

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(hf, "_write_safetensors", boom)
  with pytest.raises(OSError, match="disk full"):
    save_hf_checkpoint(out, c, p, dtype="bfloat16")
  assert os.listdir(tmp_path) == ["ckpt"]
  assert (out / "model.safetensors").read_bytes() == before


def test_save_rejects_mismatched_params(tmp_path):
  c, p = load_hf_checkpoint(TINY)
  p = dict(p, embed=p["embed"][:, :-1])
  del p["final_norm"]
  with pytest.raises(ValueError) as e:
    save_hf_checkpoint(tmp_path / "out", c, p)
  msg = str(e.value)
  assert "missing: final_norm" in msg
  assert "wrong shape: embed expected (512, 64) got (512, 63)" in msg
  assert os.listdir(tmp_path) == []


# ---- malformed checkpoints -------------------------------------------------------------------
def test_missing_tensor(tmp_path):
  ckpt = _copy(tmp_path)
  _rewrite_weights(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
  msg = _error_message(ValueError, ckpt)
  assert "does not match the config" in msg and str(ckpt) in msg
  assert "missing: model.layers.2.mlp.experts.3.up_proj.weight" in msg
  assert "unexpected" not in msg and "wrong shape" not in msg


def test_unexpected_tensor(tmp_path):
  ckpt = _copy(tmp_path)
  extra = {"model.layers.1.mlp.gate.bias": np.zeros(8, np.float32)}
  _rewrite_weights(ckpt, lambda t: t.update(extra))
  msg = _error_message(ValueError, ckpt)
  assert "unexpected: model.layers.1.mlp.gate.bias" in msg and "missing" not in msg


def test_wrong_shape(tmp_path):
  ckpt = _copy(tmp_path)
  name = "model.layers.0.attention.dense.weight"
  _rewrite_weights(ckpt, lambda t: t.update({name: t[name][:, :-1].copy()}))
  msg = _error_message(ValueError, ckpt)
  assert f"wrong shape: {name} expected (64, 64) got (64, 63)" in msg


def test_all_problems_in_one_error(tmp_path):
  ckpt = _copy(tmp_path)

  def edit(t):
    t.pop("lm_head.weight")
    t.pop("model.norm.weight")
    t["extra.weight"] = np.zeros(3, np.float32)
    t["model.layers.1.mlp.gate.expert_bias"] = np.zeros(9, np.float32)

  _rewrite_weights(ckpt, edit)
  msg = _error_message(ValueError, ckpt)
  assert "missing: model.norm.weight, lm_head.weight" in msg  # checkpoint order
  assert "unexpected: extra.weight" in msg
  assert "wrong shape: model.layers.1.mlp.gate.expert_bias expected (8,) got (9,)" in msg


def test_long_lists_are_truncated(tmp_path):
  ckpt = _copy(tmp_path)  # 16 experts in the config, 8 in the weights: 2 layers * 8 * 3 missing
  _rewrite_config(ckpt, lambda d: d.update(num_experts=16))
  msg = _error_message(ValueError, ckpt)
  assert "missing: " in msg and "and 38 more" in msg
  assert "wrong shape: model.layers.1.mlp.gate.weight expected (16, 64) got (8, 64)" in msg


def test_wrong_tensor_dtype(tmp_path):
  ckpt = _copy(tmp_path)
  name = "model.norm.weight"
  _rewrite_weights(ckpt, lambda t: t.update({name: t[name].astype(np.int32)}))
  assert f"wrong dtype: {name} (I32)" in _error_message(ValueError, ckpt)


@pytest.mark.parametrize("edit, expected", [
    (dict(num_key_value_heads=3),
     "num_attention_heads (4) is not divisible by num_key_value_heads (3)"),
    (dict(n_group=3), "n_group (3) does not divide num_experts (8)"),
    (dict(torch_dtype="int8"), "unsupported torch_dtype 'int8'"),
])
def test_invalid_config_value(tmp_path, edit, expected):
  ckpt = _copy(tmp_path)
  _rewrite_config(ckpt, lambda d: d.update(edit))
  msg = _error_message(ValueError, ckpt)
  assert "invalid model config" in msg and expected in msg


def test_missing_config_key(tmp_path):
  ckpt = _copy(tmp_path)
  _rewrite_config(ckpt, lambda d: d.pop("num_experts"))
  msg = _error_message(ValueError, ckpt)
  assert "missing required key(s) num_experts" in msg


def test_missing_config_file(tmp_path):
  ckpt = _copy(tmp_path)
  os.remove(ckpt / "config.json")
  assert "no config.json" in _error_message(FileNotFoundError, ckpt)


def test_missing_weights_file(tmp_path):
  ckpt = _copy(tmp_path)
  os.remove(ckpt / "model.safetensors")
  msg = _error_message(FileNotFoundError, ckpt)
  assert "model.safetensors" in msg and "model.safetensors.index.json" in msg


def test_missing_directory(tmp_path):
  msg = _error_message(ValueError, tmp_path / "nope")
  assert msg == f"no such checkpoint directory: {tmp_path / 'nope'}"


def test_index_with_missing_shard(tmp_path):
  c, p = load_hf_checkpoint(TINY)
  out = tmp_path / "ckpt"
  save_hf_checkpoint(out, c, p, max_shard_bytes=_two_shard_limit(c)[0])
  os.remove(out / "model-00002-of-00002.safetensors")
  msg = _error_message(FileNotFoundError, out)
  assert "references missing shard file(s): model-00002-of-00002.safetensors" in msg


def test_index_naming_wrong_shard(tmp_path):
  c, p = load_hf_checkpoint(TINY)
  out = tmp_path / "ckpt"
  save_hf_checkpoint(out, c, p, max_shard_bytes=_two_shard_limit(c)[0])
  with open(out / "model.safetensors.index.json") as f:
    index = json.load(f)
  index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
  with open(out / "model.safetensors.index.json", "w") as f:
    json.dump(index, f)
  msg = _error_message(ValueError, out)
  assert "missing: lm_head.weight (not in model-00001-of-00002.safetensors)" in msg


def test_bad_dtype_argument():
  with pytest.raises(ValueError, match="param_dtype must be one of"):
    load_hf_checkpoint(TINY, dtype="int8")
