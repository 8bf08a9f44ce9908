"""Per-device checkpoint I/O: params created directly in their shardings, and sharded params
gathered to the host one HF tensor at a time.

Loading: a param leaf `[*stack, *inner]` (`stack` = layers, or layers x experts) is filled from
the HF tensors `leaf[index]` (`hf.hf_tensor_table`). A device whose shard is the block
`leaf[s_0, ..., s_n]` needs, for every stacked position in `s_0 x ... x s_{k-1}`, only the
sub-slice `[s_k, ..., s_n]` of that HF tensor (reversed, `[s_n, ..., s_k]`, for a tensor stored
transposed); `read_shard` reads exactly those bytes through `safe_open(...).get_slice(name)`.
`load_leaf` does that for each addressable device in turn and puts the block on its device before
reading the next, so a process holds at most one device block (plus one tensor slice) on the
host at a time, and on multi-host reads only what its own devices hold.

Saving: `host_slicer` returns `idx -> x[idx]` on the host for a stacked leaf. For a leaf sharded
by a `NamedSharding` that is one small SPMD program (compiled once per leaf, `idx` traced): every
device cuts the wanted tensor out of its block, the owners' bits are summed (as unsigned
integers, so the result is exact: every other device adds 0) over the mesh axes of the stacked
dims, and the inner dims are all-gathered. Device memory: a few copies of one tensor; it is a
collective, so every process must call it, in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

Index = tuple[slice, ...]


class TensorReader:
  """Reads (slices of) named tensors from safetensors files, each file opened once.

  `files` maps tensor name -> file. Use as a context manager; the files are closed on exit.
  """

  def __init__(self, files: dict[str, str]):
    self._files = files
    self._handles: dict[str, object] = {}
    self._stack = contextlib.ExitStack()

  def __enter__(self) -> "TensorReader":
    return self

  def __exit__(self, *exc) -> None:
    self._handles.clear()
    self._stack.close()

  def read(self, name: str, index: Index) -> np.ndarray:
    """`tensor[index]` of tensor `name` (HF layout, its stored dtype); reads only that slice."""
    file = self._files[name]
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
    return self._handles[file].get_slice(name)[index]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """One param leaf `[*shape]` and the HF tensors it is stacked from.

  `tensors` maps a stacked position (the leading `stacked` indices: `()`, `(layer,)` or
  `(layer, expert)`) to its `hf.HFTensor`.
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  stacked: int
  tensors: dict  # tuple[int, ...] -> hf.HFTensor


def _ranges(index: Index, shape: Sequence[int]) -> list[range]:
  return [range(*s.indices(n)) for s, n in zip(index, shape)]


def read_shard(reader: TensorReader, leaf: LeafPlan, index: Index) -> np.ndarray:
  """The block `leaf[index]` (one device's shard, `[*block]`) in `leaf.dtype`, read from the files.

  For each stacked position in the block, only the inner slice `index[stacked:]` of that HF tensor
  is read (as `[s_n, ..., s_k]` of a transposed tensor, then transposed); the cast to `leaf.dtype`
  is numpy's assignment cast, as in the unsharded load.
  """
  ranges = _ranges(index, leaf.shape)
  out = np.empty(tuple(len(r) for r in ranges), leaf.dtype)
  k = leaf.stacked
  inner = tuple(slice(r.start, r.stop) for r in ranges[k:])
  for pos in itertools.product(*ranges[:k]):
    t = leaf.tensors[pos]
    x = reader.read(t.name, inner[::-1] if t.transpose else inner)
    out[tuple(p - r.start for p, r in zip(pos, ranges[:k]))] = x.T if t.transpose else x
    del x
  return out


def load_leaf(reader: TensorReader, leaf: LeafPlan, sharding: jax.sharding.Sharding) -> jax.Array:
  """The leaf as a global `jax.Array` `[*leaf.shape]` in `sharding`: each addressable device's
  block is read (`read_shard`) and put on that device before the next one is read."""
  blocks = []
  for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
    blocks.append(jax.device_put(read_shard(reader, leaf, index), device))
  return jax.make_array_from_single_device_arrays(leaf.shape, sharding, blocks)


# ---- gathering for saving ------------------------------------------------------------------------
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_slicer(x: jax.Array, stacked: int) -> Callable[[tuple[int, ...]], np.ndarray]:
  """`idx -> x[idx]` on the host for `x` [*stack, *inner] sharded by a NamedSharding (see the
  module doc). Collective: all processes call it with the same `idx`."""
  sharding: NamedSharding = x.sharding
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  block = sharding.shard_shape(x.shape)
  stack_axes = [_axes(e) for e in spec[:stacked]]
  reduce_axes = tuple(a for axes in stack_axes for a in axes)
  gathers = [(d - stacked, _axes(e)) for d, e in enumerate(spec) if d >= stacked and _axes(e)]
  dtype = x.dtype
  if reduce_axes and dtype.itemsize not in _UINT:
    raise ValueError(f"cannot gather a {dtype} leaf sharded over its stacked axes")

  def local(xb, idx):  # xb: this device's block [*block]; idx: [stacked] int32, global
    owned = jnp.bool_(True)
    for a in range(stacked):
      i = idx[a]
      if stack_axes[a]:
        i = i - lax.axis_index(stack_axes[a]) * block[a]
        owned &= (i >= 0) & (i < block[a])
        i = jnp.clip(i, 0, block[a] - 1)
      xb = lax.dynamic_index_in_dim(xb, i, axis=0, keepdims=False)
    if reduce_axes:  # exactly one device per group owns the tensor: an exact integer sum
      bits = lax.bitcast_convert_type(xb, _UINT[dtype.itemsize]).astype(jnp.uint32)
      bits = lax.psum(jnp.where(owned, bits, jnp.uint32(0)), reduce_axes)
      xb = lax.bitcast_convert_type(bits.astype(_UINT[dtype.itemsize]), dtype)
    for d, axes in gathers:
      xb = lax.all_gather(xb, axes, axis=d, tiled=True)
    return xb

  # check_vma=False: `all_gather` results are typed as varying, yet they are replicated.
  fn = jax.jit(jax.shard_map(local, mesh=sharding.mesh, in_specs=(P(*spec), P()),
                             out_specs=P(), check_vma=False))

  def get(idx: tuple[int, ...]) -> np.ndarray:
    out = fn(x, np.asarray(idx, np.int32).reshape(stacked))
    return np.asarray(out.addressable_data(0))
  return get


def host_slicer(x, stacked: int) -> Callable[[tuple[int, ...]], np.ndarray]:
  """`idx -> x[idx]` as a host numpy array `[*x.shape[stacked:]]`, for a stacked param leaf `x`
  [*stack, *inner] (`stacked` leading axes) that is a numpy array, a single-device or fully
  replicated `jax.Array` (read from a local copy), or a `jax.Array` sharded by a
  `NamedSharding` (gathered one tensor at a time: a collective on multi-host)."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated:
      local = x.addressable_data(0)
      return lambda idx: np.asarray(local[idx] if idx else local)
    if isinstance(x.sharding, NamedSharding):
      return _sharded_slicer(x, stacked)
    if not x.is_fully_addressable:
      raise ValueError(f"cannot gather an array with sharding {x.sharding}")
  return lambda idx: np.asarray(x[idx] if idx else x)
