"""Per-device checkpoint I/O: params created directly in their shardings, and sharded params
gathered to the host one HF tensor at a time.

Loading: a param leaf `[*stack, *inner]` (`stack` = layers, or layers x experts) is filled from
the HF tensors `leaf[index]` (`hf.hf_tensor_table`). A device whose shard is the block
`leaf[s_0, ..., s_n]` needs, for every stacked position in `s_0 x ... x s_{k-1}`, only the
sub-slice `[s_k, ..., s_n]` of that HF tensor (reversed, `[s_n, ..., s_k]`, for a tensor stored
transposed); `read_shard` reads exactly those elements (`TensorReader.read_into`).

`load_leaf` reads each distinct block of the process's devices once (replicas share one read,
and get device-to-device copies), waits for the transfers and drops the host block before
reading the next one. Host memory during a load is therefore the device arrays made so far plus
one block plus one mapped window of a file: `TensorReader` maps at most `chunk_bytes` of a tensor
at a time and unmaps it after copying, so the pages of the checkpoint files do not stay resident
in the process (as they do while a whole file is mapped, e.g. by `safe_open`). On multi-host
each process reads only what its own devices hold.

Saving: `host_slicer` returns `idx -> x[idx]` on the host for a stacked leaf. For a leaf sharded
by a `NamedSharding` that is one small SPMD program (compiled once per leaf, `idx` traced): every
device cuts the wanted tensor out of its block, the owners' bits are summed (as unsigned
integers, so the result is exact: every other device adds 0) over the mesh axes of the stacked
dims, and the inner dims are all-gathered. Device memory: a few copies of one tensor; it is a
collective, so every process must call it, in the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import mmap
import os
import struct
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

Index = tuple[slice, ...]

# safetensors dtype names -> numpy dtypes (BF16 as ml_dtypes.bfloat16, as safetensors' numpy
# framework returns it).
_ST_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
             "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
             "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
             "U8": np.uint8, "BOOL": np.bool_}
CHUNK_BYTES = 32 << 20  # the most file bytes `TensorReader` maps at once (at least one row)
_TRANSPOSE_ROWS = 16  # source rows per step of a transposed copy (see `_copy_transposed`)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """Where one tensor lies in a safetensors file: `shape` elements of `dtype`, row-major, from
  byte `offset` of the file."""

  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int


def read_header(file: str) -> dict[str, StoredTensor]:
  """Name -> `StoredTensor` of every tensor in a safetensors file (its header only: an 8-byte
  little-endian length, the JSON header, then the data)."""
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    dtype = np.dtype(_ST_NUMPY[info["dtype"]])
    shape = tuple(int(d) for d in info["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise ValueError(f"{file}: tensor {name} has {end - begin} bytes, not {shape} x {dtype}")
    out[name] = StoredTensor(file, dtype, shape, 8 + n + begin)
  return out


def _copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
  """`dst[...] = src.T` (numpy's assignment cast). A plain `dst[...] = src.T` walks `dst` in
  order and `src` down its columns, touching a new source cache line for every element (about
  100-250 MB/s for a [8192, 2048] bf16 tensor on a 2-core host); copying `_TRANSPOSE_ROWS`
  source rows at a time uses each source line for that many elements (2-5x faster)."""
  if src.ndim != 2:
    np.copyto(dst, src.T, casting="unsafe")
    return
  for i in range(0, src.shape[0], _TRANSPOSE_ROWS):
    np.copyto(dst[:, i:i + _TRANSPOSE_ROWS], src[i:i + _TRANSPOSE_ROWS].T, casting="unsafe")


class TensorReader:
  """Copies (slices of) named tensors out of safetensors files without keeping them mapped.

  `files` maps tensor name -> file. Each file is opened once (its header read on first use);
  `read_into` maps the rows of the wanted slice `chunk_bytes` at a time (`mmap` of just that
  byte range), copies the slice out of each window (transposing and casting on the way) and
  unmaps it, so the process never holds more than one window of file pages. Use as a context
  manager; the files are closed on exit.
  """

  def __init__(self, files: dict[str, str], chunk_bytes: int = CHUNK_BYTES):
    self._files = files
    self._chunk_bytes = chunk_bytes
    self._fds: dict[str, int] = {}
    self._tensors: dict[str, StoredTensor] = {}

  def __enter__(self) -> "TensorReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    fds, self._fds = self._fds, {}
    for fd in fds.values():
      os.close(fd)

  def tensor(self, name: str) -> StoredTensor:
    """Where tensor `name` is stored (its file's header is read on first use)."""
    if name not in self._tensors:
      file = self._files[name]
      self._tensors.update(read_header(file))
      if name not in self._tensors:
        raise KeyError(f"tensor {name} not in {file}")
    return self._tensors[name]

  def _fd(self, file: str) -> int:
    if file not in self._fds:
      self._fds[file] = os.open(file, os.O_RDONLY)
    return self._fds[file]

  def read_into(self, name: str, index: Index, out: np.ndarray, transpose: bool = False) -> int:
    """`out[...] = tensor[index]` (`tensor[index].T` when `transpose`), cast to `out.dtype` as
    numpy's assignment does; `index` holds one slice per dim of the stored tensor. Returns the
    bytes of the slice as stored (elements x the file's itemsize)."""
    t = self.tensor(name)
    index = tuple(index) + (slice(None),) * (len(t.shape) - len(index))
    ranges = [range(*s.indices(n)) for s, n in zip(index, t.shape)]
    want = tuple(len(r) for r in ranges)
    if out.shape != (want[::-1] if transpose else want):
      raise ValueError(f"{name}{list(want)}: cannot copy into an array of shape {out.shape}")
    nbytes = math.prod(want) * t.dtype.itemsize
    if nbytes == 0:
      return 0
    if not t.shape:  # a scalar
      self._copy_rows(t, 0, 1, out, transpose, lambda x: x[0])
      return nbytes
    rows, rest = ranges[0], index[1:]
    if rows.step != 1:
      raise ValueError(f"{name}: strided slice {index[0]} of the first dim")
    row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
    step = max(1, self._chunk_bytes // max(row_bytes, 1))
    for a in range(rows.start, rows.stop, step):
      b = min(a + step, rows.stop)
      i, j = a - rows.start, b - rows.start
      dst = out[..., i:j] if transpose else out[i:j]
      self._copy_rows(t, a, b, dst, transpose, lambda x: x[(slice(None),) + rest])
    return nbytes

  def _copy_rows(self, t: StoredTensor, a: int, b: int, dst, transpose, cut) -> None:
    """Maps rows `a:b` of `t`, copies `cut(rows)` (`.T` when `transpose`) into `dst`, unmaps."""
    row = math.prod(t.shape[1:]) * t.dtype.itemsize
    start, stop = t.offset + a * row, t.offset + b * row
    base = start - start % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(self._fd(t.file), stop - base, access=mmap.ACCESS_READ, offset=base)
    try:
      x = cut(np.frombuffer(m, t.dtype, (stop - start) // t.dtype.itemsize, start - base)
              .reshape((b - a,) + t.shape[1:]))
      if transpose:
        _copy_transposed(dst, x)
      else:
        np.copyto(dst, x, casting="unsafe")
      del x
    finally:
      try:
        m.close()
      except BufferError:  # a view is still referenced (an exception's traceback); the mapping
        pass  # goes when that does

  def read(self, name: str, index: Index = ()) -> np.ndarray:
    """`tensor[index]` as a new array in the stored dtype."""
    t = self.tensor(name)
    index = tuple(index) + (slice(None),) * (len(t.shape) - len(index))
    out = np.empty(tuple(len(range(*s.indices(n))) for s, n in zip(index, t.shape)), t.dtype)
    self.read_into(name, index, out)
    return out


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


def empty_aligned(shape: Sequence[int], dtype) -> np.ndarray:
  """An uninitialised array in fresh private anonymous memory of its own (`mmap`: page-aligned,
  unmapped once the array and its views are gone).

  Page alignment lets jax's CPU client adopt the array as the device buffer of `jax.device_put`
  (no copy; a numpy allocation is 16-byte aligned and gets copied); other platforms copy it to
  the device either way. Its own mapping also keeps numpy's `madvise(MADV_HUGEPAGE)` off it:
  with transparent huge pages in `defrag=madvise` mode the kernel compacts memory synchronously
  on first touch of such pages, which doubled the load time on a busy host.
  """
  dtype = np.dtype(dtype)
  n = math.prod(shape) * dtype.itemsize
  if n == 0:
    return np.empty(tuple(shape), dtype)
  private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
  memory = mmap.mmap(-1, n, flags=private) if private else mmap.mmap(-1, n)
  return np.frombuffer(memory, dtype).reshape(tuple(shape))


def read_shard(reader: TensorReader, leaf: LeafPlan, index: Index) -> np.ndarray:
  """The block `leaf[index]` (one device's shard, `[*block]`) in `leaf.dtype`, read from the files.

  For each stacked position in the block, only the inner slice `index[stacked:]` of that HF tensor
  is read (as `[s_n, ..., s_k]` of a transposed tensor, then transposed), straight into the block;
  the cast to `leaf.dtype` is numpy's assignment cast, as in the unsharded load.
  """
  ranges = _ranges(index, leaf.shape)
  out = empty_aligned(tuple(len(r) for r in ranges), leaf.dtype)
  k = leaf.stacked
  inner = tuple(slice(r.start, r.stop) for r in ranges[k:])
  for pos in itertools.product(*ranges[:k]):
    t = leaf.tensors[pos]
    dst = out[tuple(p - r.start for p, r in zip(pos, ranges[:k]))]
    reader.read_into(t.name, inner[::-1] if t.transpose else inner, dst, t.transpose)
  return out


def _block_key(index: Index, shape: Sequence[int]) -> tuple:
  return tuple(s.indices(n) for s, n in zip(index, shape))


def load_leaf(reader: TensorReader, leaf: LeafPlan, sharding: jax.sharding.Sharding) -> jax.Array:
  """The leaf as a global `jax.Array` `[*leaf.shape]` in `sharding`.

  Each distinct block among this process's devices' shards is read once (`read_shard`) and put
  on the first device that holds it; the other devices holding the same block (replicas) get
  device-to-device copies of that array, each its own buffer. The host block is released (on
  CPU it *is* the first device's buffer) once those transfers are done, before the next block is
  read: besides the arrays made so far, one block and one mapped window of a file.
  """
  owned = sharding.addressable_devices_indices_map(leaf.shape)
  groups: dict[tuple, tuple[Index, list]] = {}
  for device, index in owned.items():
    groups.setdefault(_block_key(index, leaf.shape), (index, []))[1].append(device)
  arrays = {}
  for index, devices in groups.values():
    block = read_shard(reader, leaf, index)
    first = jax.device_put(block, devices[0])
    del block
    put = [first] + [jax.device_put(first, d) for d in devices[1:]]
    jax.block_until_ready(put)
    arrays.update(zip(devices, put))
    del first, put
  return jax.make_array_from_single_device_arrays(leaf.shape, sharding,
                                                  [arrays[d] for d in owned])


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
