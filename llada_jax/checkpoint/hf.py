"""Hugging Face LLaDA2 checkpoints (`config.json` + safetensors) <-> our stacked params pytree.

The HF checkpoint stores one tensor per layer and per expert under the official names (SPEC 2),
Linear weights as `[out, in]`. Our params (see `llada_jax.model.params`) stack layers (and
experts) on leading axes and store matrices `[in, out]`. `hf_tensor_table` is the one mapping
both directions use: one `HFTensor` per official name, saying which slice of which leaf it is
and whether it is transposed.

Checkpoints are validated with `safetensors` (names, shapes, dtypes); tensors are read by
`llada_jax.checkpoint.sharded.TensorReader`, which copies the wanted slices straight out of the
files into the stacked leaf (or device block) being built, BF16 as `ml_dtypes.bfloat16`, so fp32,
bf16 and fp16 checkpoints go through the same code. Tensors are written by a streaming writer
that lays files out exactly as `safetensors.numpy.save_file` does, one tensor in host memory at
a time.

With a mesh, `load_hf_checkpoint` creates every param directly in its `NamedSharding` (from the
logical-axis rules), each process reading only the slices its own devices hold, once for all
local replicas (`llada_jax.checkpoint.sharded`); `save_hf_checkpoint` takes sharded params,
gathers them one tensor at a time and writes from process 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import uuid
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from llada_jax.checkpoint import sharded
from llada_jax.checkpoint.hub import resolve_checkpoint
from llada_jax.config import ModelConfig
from llada_jax.model.params import Params, leaf_dtype, param_shapes, param_specs

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it.
_MAX_LISTED = 10


# ---- the name table ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One official HF tensor: `params[path][index]` (transposed when `transpose`) is `shape`."""

  name: str
  path: tuple[str, ...]  # keys into the params pytree, e.g. ("moe", "experts", "gate")
  index: tuple[int, ...]  # leading indices into the stacked leaf: (layer,) or (layer, expert)
  transpose: bool  # HF [out, in] vs our [in, out]
  shape: tuple[int, ...]  # HF shape


def _spec_shape(specs: dict, path: tuple[str, ...]) -> tuple[int, ...]:
  node = specs
  for k in path:
    node = node[k]
  return node[0]


def _entry(specs, name, path, index=(), transpose=False) -> HFTensor:
  shape = _spec_shape(specs, path)[len(index):]
  return HFTensor(name, path, index, transpose, tuple(shape[::-1] if transpose else shape))


def _layer_entries(c: ModelConfig, specs: dict, layer: int) -> Iterator[HFTensor]:
  """The tensors of decoder layer `layer` (global index), in checkpoint order."""
  dense = layer < c.num_dense_layers
  stack = "dense" if dense else "moe"
  i = (layer if dense else layer - c.num_dense_layers,)
  p = f"model.layers.{layer}."
  yield _entry(specs, p + "input_layernorm.weight", (stack, "input_norm"), i)
  yield _entry(specs, p + "attention.query_key_value.weight", (stack, "attn", "qkv"), i, True)
  yield _entry(specs, p + "attention.query_layernorm.weight", (stack, "attn", "q_norm"), i)
  yield _entry(specs, p + "attention.key_layernorm.weight", (stack, "attn", "k_norm"), i)
  yield _entry(specs, p + "attention.dense.weight", (stack, "attn", "out"), i, True)
  yield _entry(specs, p + "post_attention_layernorm.weight", (stack, "post_norm"), i)
  if dense:
    for proj in ("gate", "up", "down"):
      yield _entry(specs, p + f"mlp.{proj}_proj.weight", (stack, "mlp", proj), i, True)
    return
  yield _entry(specs, p + "mlp.gate.weight", (stack, "router", "weight"), i, True)
  yield _entry(specs, p + "mlp.gate.expert_bias", (stack, "router", "expert_bias"), i)
  for e in range(c.num_experts):
    for proj in ("gate", "up", "down"):
      yield _entry(specs, p + f"mlp.experts.{e}.{proj}_proj.weight",
                   (stack, "experts", proj), i + (e,), True)
  if c.shared_intermediate_size:
    for proj in ("gate", "up", "down"):
      yield _entry(specs, p + f"mlp.shared_experts.{proj}_proj.weight",
                   (stack, "shared", proj), i, True)


def hf_tensor_table(c: ModelConfig) -> list[HFTensor]:
  """Every tensor of an HF checkpoint of `c`, in checkpoint order (embeddings, layers, head)."""
  specs = param_specs(c)
  table = [_entry(specs, "model.word_embeddings.weight", ("embed",))]
  for layer in range(c.num_hidden_layers):
    table.extend(_layer_entries(c, specs, layer))
  table.append(_entry(specs, "model.norm.weight", ("final_norm",)))
  table.append(_entry(specs, "lm_head.weight", ("lm_head",), (), True))
  return table


def hf_tensor_names(c: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Official HF name -> HF shape of every tensor of a checkpoint of `c`."""
  return {t.name: t.shape for t in hf_tensor_table(c)}


# ---- shared helpers ------------------------------------------------------------------------------
def _dtype_name(dtype) -> str:
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'") from None


def _with_dtype(c: ModelConfig, dtype) -> ModelConfig:
  if dtype is None:
    return c
  name = _dtype_name(dtype)
  return c.replace(param_dtype=name, dtype=name)


def _listed(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f" and {more} more" if more > 0 else "")


def _mismatch_error(what: str, problems: dict[str, list[str]]) -> ValueError:
  """One single-line `ValueError` listing every kind of problem (at most 10 items per kind)."""
  parts = [f"{kind}: {_listed(items)}" for kind, items in problems.items() if items]
  return ValueError(f"{what} does not match the config: " + "; ".join(parts))


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


# ---- loading -------------------------------------------------------------------------------------
def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file (absolute path), from the single file or the shard index."""
  single = os.path.join(path, SAFE_WEIGHTS_NAME)
  index = os.path.join(path, SAFE_INDEX_NAME)
  if os.path.exists(single):
    with safe_open(single, framework="numpy") as f:
      return {k: single for k in f.keys()}
  if not os.path.exists(index):
    raise FileNotFoundError(f"no weights in checkpoint {path}: neither {SAFE_WEIGHTS_NAME} nor "
                            f"{SAFE_INDEX_NAME} exists")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"invalid shard index {index}: expected JSON with a 'weight_map' "
                     f"object ({e!r})") from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise ValueError(f"invalid shard index {index}: 'weight_map' must map names to file names")
  missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(path, v))})
  if missing:
    raise FileNotFoundError(f"shard index {index} references missing shard file(s): "
                            f"{_listed(missing)}")
  return {k: os.path.join(path, v) for k, v in weight_map.items()}


def _check_tensors(path: str, c: ModelConfig, files: dict[str, str]) -> None:
  """Raises one `ValueError` listing every missing, unexpected, mis-shaped or non-float tensor."""
  expected = hf_tensor_names(c)
  problems = {"missing": [], "unexpected": sorted(set(files) - set(expected)),
              "wrong shape": [], "wrong dtype": []}
  by_file: dict[str, list[str]] = {}
  for name in expected:
    if name in files:
      by_file.setdefault(files[name], []).append(name)
    else:
      problems["missing"].append(name)
  for file, names in by_file.items():
    with safe_open(file, framework="numpy") as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          problems["missing"].append(f"{name} (not in {os.path.basename(file)})")
          continue
        sl = f.get_slice(name)
        got = tuple(sl.get_shape())
        if got != expected[name]:
          problems["wrong shape"].append(f"{name} expected {expected[name]} got {got}")
        if sl.get_dtype() not in ("F32", "BF16", "F16"):
          problems["wrong dtype"].append(f"{name} ({sl.get_dtype()})")
  if any(problems.values()):
    raise _mismatch_error(f"checkpoint {path}", problems)


def load_hf_checkpoint(path: str | os.PathLike, *, dtype=None, mesh=None,
                       rules=None) -> tuple[ModelConfig, Params]:
  """Loads an HF LLaDA2 checkpoint directory (or hub id) into `(config, params)`.

  `path` holds `config.json` and either `model.safetensors` or `model.safetensors.index.json`
  plus its shards; it may also be a Hugging Face hub id such as `inclusionAI/LLaDA2.1-mini`
  (`resolve_checkpoint`: downloaded once, then read from the local cache). `dtype=None` keeps
  the checkpoint's `torch_dtype` as `param_dtype`; `dtype="bfloat16"`/`"float32"` overrides both
  `param_dtype` and the compute `dtype`. Router leaves stay float32. Every tensor is checked
  (names, shapes) before any weight is read; all problems are reported in one `ValueError`.

  Without `mesh`, each stacked leaf is read into one host array and put on the default device
  before the next leaf is read (on CPU the host array becomes the device buffer: no second copy).
  With `mesh` (a `jax.sharding.Mesh`, e.g. `llada_jax.parallel.make_mesh("data=2,expert=4")`),
  every leaf is created directly in its `NamedSharding` from the logical-axis `rules` (anything
  `llada_jax.parallel.rules.normalize_rules` takes; default `DEFAULT_RULES`): each distinct
  block of the addressable devices is read from the files once, only the slices of the HF
  tensors it holds, and put on the devices holding it before the next block is read (on
  multi-host: only this process's devices). Either way the host holds, besides the params made
  so far, at most one leaf or block and a bounded window of file pages
  (`llada_jax.checkpoint.sharded`). Values equal the unsharded load exactly. `rules` is only used
  with a `mesh`.
  """
  path = os.path.abspath(resolve_checkpoint(path))
  config = _with_dtype(ModelConfig.from_json_file(os.path.join(path, CONFIG_NAME)), dtype)
  files = _weight_files(path)
  _check_tensors(path, config, files)
  if mesh is not None:
    return config, _load_sharded(config, files, mesh, rules)
  return config, _load_unsharded(config, files)


def leaf_plans(c: ModelConfig) -> dict[tuple[str, ...], sharded.LeafPlan]:
  """Params path -> `LeafPlan` (shape, storage dtype, the HF tensors stacked into it)."""
  plans: dict[tuple[str, ...], sharded.LeafPlan] = {}
  shapes = param_shapes(c)
  for t in hf_tensor_table(c):
    if t.path not in plans:
      s = _get(shapes, t.path)
      plans[t.path] = sharded.LeafPlan(t.path, tuple(s.shape), np.dtype(s.dtype), len(t.index), {})
    plans[t.path].tensors[t.index] = t
  return plans


def _as_params(c: ModelConfig, leaves: dict[tuple[str, ...], Any]) -> Params:
  """The params pytree (nested dicts in `param_shapes` order) of `leaves` (path -> leaf)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: leaves[tuple(k.key for k in p)], param_shapes(c))


def _load_sharded(c: ModelConfig, files: dict[str, str], mesh, rules) -> Params:
  """Every leaf read straight into its `NamedSharding` on `mesh` (see `load_hf_checkpoint`)."""
  from llada_jax.parallel.rules import param_shardings  # noqa: PLC0415 (import cycle)
  shardings = param_shardings(c, mesh, rules)
  leaves = {}
  with sharded.TensorReader(files) as reader:
    for path, leaf in leaf_plans(c).items():
      leaves[path] = sharded.load_leaf(reader, leaf, _get(shardings, path))
  return _as_params(c, leaves)


def _load_unsharded(c: ModelConfig, files: dict[str, str]) -> Params:
  """Every leaf read whole (`sharded.read_shard`) and put on the default device (uncommitted),
  the host array released before the next leaf is read."""
  leaves = {}
  with sharded.TensorReader(files) as reader:
    for path, leaf in leaf_plans(c).items():
      host = sharded.read_shard(reader, leaf, tuple(slice(None) for _ in leaf.shape))
      leaves[path] = jax.device_put(host)
      del host
      leaves[path].block_until_ready()
  return _as_params(c, leaves)


# ---- saving --------------------------------------------------------------------------------------
def _check_params(c: ModelConfig, params: Params) -> None:
  """Raises one `ValueError` when the params tree does not have the leaves/shapes of `c`."""
  specs = param_specs(c)
  want = {p: _get(specs, p)[0] for p in _leaf_paths(specs)}
  have = {p: tuple(np.shape(_get(params, p))) for p in _leaf_paths(params)}
  dot = ".".join
  problems = {
      "missing": sorted(dot(p) for p in set(want) - set(have)),
      "unexpected": sorted(dot(p) for p in set(have) - set(want)),
      "wrong shape": sorted(f"{dot(p)} expected {want[p]} got {have[p]}"
                            for p in set(want) & set(have) if want[p] != have[p]),
  }
  if any(problems.values()):
    raise _mismatch_error("params", problems)


def _tensor_bytes(c: ModelConfig, t: HFTensor) -> int:
  return int(np.prod(t.shape)) * leaf_dtype(c, t.path).itemsize


def _plan_shards(c: ModelConfig, table: list[HFTensor],
                 max_shard_bytes: int | None) -> list[list[HFTensor]]:
  """Greedy split in checkpoint order: a new shard starts when the next tensor would overflow."""
  if max_shard_bytes is None:
    return [table]
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  shards, size = [[]], 0
  for t in table:
    n = _tensor_bytes(c, t)
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += n
  return shards


# safetensors dtype names, in the order `save_file` lays tensors out (wider first, then by name).
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ST_ORDER = tuple(_ST_DTYPES.values())


def _st_dtype(c: ModelConfig, t: HFTensor) -> str:
  name = leaf_dtype(c, t.path).name
  if name not in _ST_DTYPES:
    raise ValueError(f"cannot save {t.name} as {name}; use 'float32', 'bfloat16' or 'float16'")
  return _ST_DTYPES[name]


def _file_layout(c: ModelConfig, tensors: list[HFTensor]) -> tuple[bytes, list[HFTensor]]:
  """The header of a safetensors file holding `tensors` (8-byte little-endian length, then the
  JSON, space-padded to a multiple of 8) and the tensors in file order: the layout
  `safetensors.numpy.save_file` writes, so the files are byte-identical to it."""
  order = sorted(tensors, key=lambda t: (_ST_ORDER.index(_st_dtype(c, t)), t.name))
  header: dict[str, Any] = {"__metadata__": _METADATA}
  offset = 0
  for t in order:
    n = _tensor_bytes(c, t)
    header[t.name] = {"dtype": _st_dtype(c, t), "shape": list(t.shape),
                      "data_offsets": [offset, offset + n]}
    offset += n
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text, order


def _tensor_source(c: ModelConfig, params: Params) -> Callable[[HFTensor], np.ndarray]:
  """`t -> ` the HF tensor `t` as a contiguous host array `[*t.shape]` in its storage dtype under
  `c`, gathered alone (`sharded.host_slicer`; a collective for sharded multi-host params)."""
  slicers: dict[tuple[str, ...], Callable] = {}

  def get(t: HFTensor) -> np.ndarray:
    if t.path not in slicers:
      slicers[t.path] = sharded.host_slicer(_get(params, t.path), len(t.index))
    x = slicers[t.path](t.index).astype(leaf_dtype(c, t.path), copy=False)
    return np.ascontiguousarray(x.T if t.transpose else x)
  return get


def _write_safetensors(file: str | None, c: ModelConfig, tensors: list[HFTensor],
                       source: Callable[[HFTensor], np.ndarray]) -> None:
  """Streams `tensors` into the safetensors `file`, one tensor in host memory at a time.

  `file=None` (processes other than 0) fetches every tensor in the same order and writes
  nothing, so that the gathers, collectives on multi-host, line up on all processes.
  """
  header, order = _file_layout(c, tensors)
  with (open(file, "wb") if file is not None else contextlib.nullcontext()) as f:
    if f is not None:
      f.write(header)
    for t in order:
      x = source(t)
      if f is not None:
        f.write(memoryview(x.reshape(-1).view(np.uint8)))
      del x


def _write_weights(directory: str | None, c: ModelConfig, params: Params,
                   max_shard_bytes: int | None) -> None:
  """The weight files (and shard index) of `params` in `directory`; `None`: gather only."""
  table = hf_tensor_table(c)
  shards = _plan_shards(c, table, max_shard_bytes)
  source = _tensor_source(c, params)
  join = (lambda name: os.path.join(directory, name)) if directory is not None else (
      lambda name: None)
  if len(shards) == 1:
    _write_safetensors(join(SAFE_WEIGHTS_NAME), c, table, source)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_safetensors(join(fname), c, shard, source)
    weight_map.update({t.name: fname for t in shard})
  if directory is None:
    return
  index = {"metadata": {"total_size": sum(_tensor_bytes(c, t) for t in table)},
           "weight_map": weight_map}
  with open(os.path.join(directory, SAFE_INDEX_NAME), "w") as f:
    json.dump(index, f, indent=2)
    f.write("\n")


def _is_checkpoint_file(name: str) -> bool:
  return name in (CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) or (
      name.startswith("model-") and name.endswith(".safetensors"))


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _carry_other_files(old: str, new: str) -> None:
  """Hard-links (or copies) every non-checkpoint entry of `old` (tokenizer files...) into `new`."""
  for name in os.listdir(old):
    if _is_checkpoint_file(name):
      continue
    src, dst = os.path.join(old, name), os.path.join(new, name)
    if os.path.isdir(src) and not os.path.islink(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _default_permissions(directory: str) -> None:
  """Gives the written files the mode a plain `open` would (0666 less the umask): the
  safetensors writer creates them owner-only (0600)."""
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(directory):
    f = os.path.join(directory, name)
    if _is_checkpoint_file(name) and os.path.isfile(f):
      os.chmod(f, 0o666 & ~umask)


def _sibling(path: str, tag: str) -> str:
  parent, base = os.path.split(path)
  return os.path.join(parent, f".{base}.{tag}-{uuid.uuid4().hex[:12]}")


def _swap_into_place(tmp: str, path: str) -> None:
  """Replaces `path` by the finished directory `tmp`.

  A new `path` is a single atomic rename. An existing one is renamed aside first (a directory
  cannot be renamed onto a non-empty one), then `tmp` takes its place and the old copy is
  deleted; should the second rename fail, the old directory is put back.
  """
  if not os.path.exists(path):
    os.replace(tmp, path)
    return
  old = _sibling(path, "old")
  os.replace(path, old)
  try:
    os.replace(tmp, path)
  except BaseException:
    os.replace(old, path)
    raise
  shutil.rmtree(old, ignore_errors=True)


def save_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, params: Params, *,
                       max_shard_bytes: int | None = None, dtype=None) -> None:
  """Writes `params` as an HF checkpoint directory (official names and `[out, in]` shapes).

  Writes `config.json` and `model.safetensors`, or, when `max_shard_bytes` is given and the
  weights exceed it, `model-0000i-of-0000N.safetensors` shards plus
  `model.safetensors.index.json`. Tensors are stored in `config.param_dtype` (or `dtype`, which
  also sets the saved `torch_dtype`); the router weight and expert bias stay float32. The
  checkpoint is built in a temporary sibling directory and renamed into place; files of an
  existing `path` that are not part of a checkpoint (e.g. tokenizer files) are kept.

  `params` may be host arrays, device arrays or arrays sharded over a mesh (also across
  processes): tensors are gathered one at a time and streamed to disk, so no process holds more
  than one tensor on the host. Only process 0 writes; on multi-host every process must call this
  with the same arguments (the gathers are collectives) and all return once the checkpoint is
  in place.
  """
  path = os.path.abspath(os.fspath(path))
  config = _with_dtype(config, dtype)
  _check_params(config, params)
  if jax.process_index() != 0:
    _write_weights(None, config, params, max_shard_bytes)
    _sync_processes(f"save_hf_checkpoint {path}")
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"cannot save a checkpoint to {path}: it is not a directory")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _sibling(path, "tmp")
  os.mkdir(tmp)
  try:
    _write_weights(tmp, config, params, max_shard_bytes)
    config.to_json_file(os.path.join(tmp, CONFIG_NAME))
    _default_permissions(tmp)
    if os.path.isdir(path):
      _carry_other_files(path, tmp)
    _swap_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _sync_processes(f"save_hf_checkpoint {path}")


def _sync_processes(name: str) -> None:
  """A barrier across processes (nothing on a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)
