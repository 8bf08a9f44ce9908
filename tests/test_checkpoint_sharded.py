"""Sharded HF checkpoint I/O: params loaded straight into their shardings, reading only the owned
slices, each once per process, with peak host memory of about the final shards; sharded params
saved one tensor at a time from process 0; hub ids from a local cache.

The checks run in subprocesses of this same file (`python tests/test_checkpoint_sharded.py
CHECK ...`): 8 fake CPU devices (meshes data=2 x expert=4, fsdp=2 x expert=2 x tensor=2, and
data=2 x expert=4 with custom rules that shard over two mesh axes at once; the peak memory of
loading a ~190 MB random checkpoint on fsdp=2 x expert=4 and expert=4 x tensor=2), two processes
of 4 CPU devices each (gloo), and an offline Hugging Face cache. The pytest process may already own
a 1-device JAX, hence the subprocesses; the checks print one JSON object (the last stdout line)
and the tests here assert on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures")
FIXTURE_NAMES = ("llada2_tiny", "llada2_tiny_groups")
# Custom rules: experts over data x expert (8-way, a tuple of mesh axes on one dim), vocab over
# expert x data, hidden dims replicated.
CUSTOM_RULES = {"expert": "data,expert", "vocab": "expert,data", "embed": ""}
CASES = (("data=2,expert=4", None), ("fsdp=2,expert=2,tensor=2", None),
         ("data=2,expert=4", CUSTOM_RULES))
HUB_ID = "inclusionAI/LLaDA2-tiny-test"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The peak-memory check: a random bf16 checkpoint of about 190 MB (largest tensor 32 MiB), loaded
# on 8 CPU devices, as stored and upcast to float32.
MEMORY_WIDTHS = dict(vocab_size=16384, hidden_size=1024, num_attention_heads=8, head_dim=128,
                     num_key_value_heads=2, intermediate_size=2048, moe_intermediate_size=256,
                     num_experts=64, num_hidden_layers=2, param_dtype="bfloat16",
                     dtype="bfloat16")
MEMORY_CASES = (("fsdp=2,expert=4", None), ("expert=4,tensor=2", "float32"))
MEMORY_SLACK = 48 << 20  # bytes: one mapped file window (sharded.CHUNK_BYTES) and the runtime


# ---- the checks (subprocess side) ----------------------------------------------------------------
def _case_name(ckpt: str, dtype, spec: str, rules) -> str:
  return f"{ckpt}|dtype={dtype}|{spec}" + ("|custom_rules" if rules else "")


@contextlib.contextmanager
def _counting_reads():
  """Records one `[leaf path, index, bytes read]` per `sharded.read_shard` call (one block, read
  once for all the local devices holding it), the bytes summed over the
  `TensorReader.read_into` calls it makes."""
  from llada_jax.checkpoint import sharded
  calls = []
  read_into, read_shard = sharded.TensorReader.read_into, sharded.read_shard

  def counted_read_into(self, name, index, out, transpose=False):
    n = read_into(self, name, index, out, transpose)
    if calls:
      calls[-1][2] += n
    return n

  def counted_read_shard(reader, leaf, index):
    calls.append([leaf.path, index, 0])
    return read_shard(reader, leaf, index)

  sharded.TensorReader.read_into = counted_read_into
  sharded.read_shard = counted_read_shard
  try:
    yield calls
  finally:
    sharded.TensorReader.read_into, sharded.read_shard = read_into, read_shard


def _file_itemsize(ckpt_dir: str, leaf) -> int:
  """Bytes per element of the leaf's tensors as stored in the checkpoint."""
  from safetensors import safe_open
  from llada_jax.checkpoint import hf
  name = next(iter(leaf.tensors.values())).name
  for file in set(hf._weight_files(ckpt_dir).values()):
    with safe_open(file, "numpy") as f:
      if name in f.keys():
        return {"F32": 4, "BF16": 2, "F16": 2}[f.get_slice(name).get_dtype()]
  raise KeyError(name)


def _read_accounting(ckpt_dir: str, config, mesh, rules, calls) -> dict:
  """What this process read, leaf by leaf, against the distinct blocks of its devices: every
  distinct block (one per group of local replicas) must be read exactly once, and each read
  must be exactly that block's bytes (in the file's dtype)."""
  import math
  import numpy as np
  from llada_jax.checkpoint import hf
  from llada_jax.parallel import rules as rules_lib
  shardings = rules_lib.param_shardings(config, mesh, rules)
  by_leaf: dict = {}
  for path, index, nbytes in calls:
    by_leaf.setdefault(path, []).append((index, nbytes))
  per_device_block: dict[int, int] = {}
  problems, leaves = [], {}

  def key(index, shape):
    return tuple(s.indices(n) for s, n in zip(index, shape))

  for path, leaf in hf.leaf_plans(config).items():
    name = ".".join(path)
    sharding = hf._get(shardings, path)
    owned = sharding.addressable_devices_indices_map(leaf.shape)
    blocks: dict = {}
    for device, index in owned.items():
      blocks.setdefault(key(index, leaf.shape), []).append(device.id)
      elems = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
      per_device_block[device.id] = (per_device_block.get(device.id, 0)
                                     + elems * np.dtype(leaf.dtype).itemsize)
    got = by_leaf.pop(path, [])
    read_keys = [key(i, leaf.shape) for i, _ in got]
    if sorted(read_keys) != sorted(blocks):
      problems.append(f"{name}: read_shard calls {read_keys} are not the distinct blocks "
                      f"{sorted(blocks)}, each once")
      continue
    file_itemsize = _file_itemsize(ckpt_dir, leaf)
    for (index, nbytes), k in zip(got, read_keys):
      elems = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
      if nbytes != elems * file_itemsize:
        problems.append(f"{name} block {k} (devices {blocks[k]}): read {nbytes} bytes, the "
                        f"block is {elems} x {file_itemsize}")
    leaves[name] = dict(size=math.prod(leaf.shape) * file_itemsize,
                        read=sum(n for _, n in got), reads=len(got),
                        spec=str(sharding.spec),
                        shards=rules_lib.shard_count(sharding.spec, mesh),
                        replicas=len(owned) // rules_lib.shard_count(sharding.spec, mesh),
                        max_devices_per_block=max(map(len, blocks.values())))
  problems += [f"unexpected reads for {'.'.join(p)}" for p in by_leaf]
  return dict(problems=problems, leaves=leaves, per_device_block=per_device_block,
              total_read=sum(n for _, _, n in calls),
              param_bytes_per_device=rules_lib.param_bytes_per_device(config, mesh, rules))


def _compare_trees(got, want, shardings=None) -> list[str]:
  """Problems: a leaf that is not a jax.Array, has another sharding or dtype, or other bytes."""
  import jax
  import numpy as np
  problems = []
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_sh = dict(jax.tree_util.tree_leaves_with_path(shardings)) if shardings else {}
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  if flat_got.keys() != flat_want.keys():
    return [f"tree mismatch: {sorted(map(str, flat_got))} vs {sorted(map(str, flat_want))}"]
  for path, x in flat_got.items():
    name = jax.tree_util.keystr(path)
    if not isinstance(x, jax.Array):
      problems.append(f"{name}: {type(x).__name__}, not a jax.Array")
      continue
    if shardings and x.sharding != flat_sh[path]:
      problems.append(f"{name}: sharding {x.sharding} != {flat_sh[path]}")
    y = np.asarray(flat_want[path])
    if x.dtype != y.dtype or np.asarray(x).tobytes() != y.tobytes():
      problems.append(f"{name}: values or dtype differ")
    if shardings:  # every replica holds its block, in a buffer of its own
      for shard in x.addressable_shards:
        if np.asarray(shard.data).tobytes() != y[shard.index].tobytes():
          problems.append(f"{name}: the shard on device {shard.device.id} differs")
      pointers = [shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards]
      if x.size and len(set(pointers)) != len(pointers):
        problems.append(f"{name}: devices share a buffer")
  return problems


def _weight_bytes(directory: str) -> dict[str, bytes]:
  return {n: open(os.path.join(directory, n), "rb").read()
          for n in sorted(os.listdir(directory)) if n.startswith("model")}


def _two_shard_limit(c) -> int:
  from llada_jax.checkpoint import hf
  sizes = [hf._tensor_bytes(c, t) for t in hf.hf_tensor_table(c)]
  return (sum(sizes) + 1) // 2 + max(sizes)


def check_sharded(tmp: str) -> dict:
  """Sharded loads of the fixtures, a 2-shard bf16 checkpoint and dtype overrides on every mesh
  case (shardings, values, bytes read per device), and sharded saves (files byte-identical to
  the unsharded save, round trip bit-identical, one tensor gathered at a time)."""
  import jax
  import llada_jax
  from llada_jax import parallel
  from llada_jax.checkpoint import hf
  from llada_jax.parallel import rules as rules_lib

  assert jax.device_count() == 8, jax.devices()
  dirs = {n: os.path.join(FIXTURES, n) for n in FIXTURE_NAMES}
  c, p = llada_jax.load_hf_checkpoint(dirs["llada2_tiny"])
  bf16 = os.path.join(tmp, "bf16_2shards")
  llada_jax.save_hf_checkpoint(bf16, c, p, dtype="bfloat16",
                               max_shard_bytes=_two_shard_limit(c.replace(param_dtype="bfloat16")))
  dirs["bf16_2shards"] = bf16
  loads = [(n, None) for n in dirs] + [("llada2_tiny", "bfloat16"), ("bf16_2shards", "float32")]
  out: dict = {"bf16_files": sorted(os.listdir(bf16))}

  # Loading.
  sharded_params = {}
  for ckpt, dtype in loads:
    c_ref, p_ref = llada_jax.load_hf_checkpoint(dirs[ckpt], dtype=dtype)
    for spec, rules in CASES:
      mesh = parallel.make_mesh(spec)
      with _counting_reads() as calls:
        c_sh, p_sh = llada_jax.load_hf_checkpoint(dirs[ckpt], dtype=dtype, mesh=mesh, rules=rules)
      shardings = rules_lib.param_shardings(c_ref, mesh, rules)
      r = _read_accounting(dirs[ckpt], c_ref, mesh, rules, calls)
      r["config_equal"] = c_sh == c_ref
      r["problems"] += _compare_trees(p_sh, p_ref, shardings)
      r["leaf_count"] = len(jax.tree_util.tree_leaves(p_sh))
      r["read_shard_calls"] = len(calls)
      out[_case_name(ckpt, dtype, spec, rules)] = r
      if dtype is None:
        sharded_params[(ckpt, spec, rules is not None)] = (c_sh, p_sh, p_ref)

  # Saving: sharded params -> the same files as the unsharded save -> bit-identical reload.
  gathered: list[int] = []
  source = hf._tensor_source

  def counting_source(c_, params_):
    get = source(c_, params_)
    def counted(t):
      x = get(t)
      gathered.append(x.nbytes)
      return x
    return counted

  hf._tensor_source = counting_source
  saves = {}
  try:
    for (ckpt, spec, custom), (c_sh, p_sh, p_ref) in sharded_params.items():
      for kw in ({}, {"dtype": "bfloat16", "max_shard_bytes": _two_shard_limit(
          c_sh.replace(param_dtype="bfloat16"))}):
        name = f"{ckpt}|{spec}|custom={custom}|{kw.get('dtype', 'same')}"
        ref_dir, sh_dir = os.path.join(tmp, "ref"), os.path.join(tmp, "sharded")
        llada_jax.save_hf_checkpoint(ref_dir, c_sh, p_ref, **kw)
        del gathered[:]
        llada_jax.save_hf_checkpoint(sh_dir, c_sh, p_sh, **kw)
        table = hf.hf_tensor_table(c_sh)
        c_back, p_back = llada_jax.load_hf_checkpoint(sh_dir)
        c_want, p_want = llada_jax.load_hf_checkpoint(ref_dir)
        saves[name] = dict(
            files=sorted(_weight_bytes(sh_dir)),
            files_identical=_weight_bytes(sh_dir) == _weight_bytes(ref_dir),
            fixture_identical=(not kw and _weight_bytes(sh_dir) == _weight_bytes(dirs[ckpt])),
            config_equal=c_back == c_want,
            reload_problems=_compare_trees(p_back, p_want),
            tensors_gathered=len(gathered), tensors=len(table),
            max_gathered_bytes=max(gathered),
            max_tensor_bytes=max(hf._tensor_bytes(c_back, t) for t in table))
  finally:
    hf._tensor_source = source
  out["saves"] = saves
  return out


def check_hub(snapshot: str) -> dict:
  """Loading by hub id from an offline cache (HF_HUB_CACHE / HF_HUB_OFFLINE set by the caller)."""
  import llada_jax
  from llada_jax.checkpoint import resolve_checkpoint
  import numpy as np
  import jax
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  fixture = os.path.join(FIXTURES, "llada2_tiny")
  c_id, p_id = llada_jax.load_hf_checkpoint(HUB_ID)
  c_dir, p_dir = llada_jax.load_hf_checkpoint(fixture)
  same = all(x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
             for x, y in zip(jax.tree_util.tree_leaves(p_id), jax.tree_util.tree_leaves(p_dir)))
  out = dict(resolved=resolve_checkpoint(HUB_ID), snapshot=snapshot, config_equal=c_id == c_dir,
             params_equal=same, local_dir_unchanged=resolve_checkpoint(fixture) == fixture)
  for what in ("inclusionAI/not-in-the-cache", "no/such/dir"):
    try:
      llada_jax.load_hf_checkpoint(what)
      out[what] = None
    except ValueError as e:
      out[what] = str(e)
  return out


def check_multihost(argv: list[str]) -> dict:
  """One of two processes (4 CPU devices each, mesh expert=8): sharded load reading only this
  process's blocks, sharded save (process 0 writes), process 0 checks the files."""
  import argparse
  from llada_jax.parallel import distributed
  ap = distributed.add_flags(argparse.ArgumentParser())
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  distributed.initialize(distributed.config_from(args), platform="cpu")
  import jax
  from jax.experimental import multihost_utils
  import llada_jax
  from llada_jax import parallel

  fixture = os.path.join(FIXTURES, "llada2_tiny")
  mesh = parallel.make_mesh("expert=8")
  with _counting_reads() as calls:
    c, p = llada_jax.load_hf_checkpoint(fixture, mesh=mesh)
  r = _read_accounting(fixture, c, mesh, None, calls)
  r["process"] = jax.process_index()
  r["local_devices"] = sorted(d.id for d in jax.local_devices())
  r["fully_addressable_leaves"] = sum(x.is_fully_addressable for x in jax.tree_util.tree_leaves(p))
  saved = os.path.join(args.out, "saved")
  llada_jax.save_hf_checkpoint(saved, c, p)
  if jax.process_index() == 0:
    r["saved_files"] = sorted(os.listdir(saved))
    r["fixture_identical"] = _weight_bytes(saved) == _weight_bytes(fixture)
  multihost_utils.sync_global_devices("checked")
  with open(os.path.join(args.out, f"process{jax.process_index()}.json"), "w") as f:
    json.dump(r, f)
  return r


def _memory_config():
  import llada_jax
  c, _ = llada_jax.load_hf_checkpoint(os.path.join(FIXTURES, "llada2_tiny"))
  return c.replace(**MEMORY_WIDTHS)


def check_write_random(ckpt: str) -> dict:
  """A random bf16 checkpoint at `MEMORY_WIDTHS` (several shard files)."""
  import jax
  import ml_dtypes
  import numpy as np
  import llada_jax
  from llada_jax.checkpoint import hf
  from llada_jax.model.params import leaf_dtype, param_shapes
  c = _memory_config()
  rng = np.random.default_rng(0)

  def leaf(path, s):
    keys = tuple(k.key for k in path)
    x = rng.standard_normal(s.shape, np.float32) * np.float32(0.02)
    return x.astype(ml_dtypes.bfloat16 if leaf_dtype(c, keys).name == "bfloat16" else np.float32)

  params = jax.tree_util.tree_map_with_path(leaf, param_shapes(c))
  llada_jax.save_hf_checkpoint(ckpt, c, params, max_shard_bytes=64 << 20)
  table = hf.hf_tensor_table(c)
  return dict(bytes=sum(hf._tensor_bytes(c, t) for t in table),
              largest=max(hf._tensor_bytes(c, t) for t in table),
              files=sorted(os.listdir(ckpt)), tensors=len(table))


def _memory_status() -> dict[str, int]:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        out[key] = int(value.split()[0]) * 1024
  return out


def check_memory(ckpt: str, spec: str, dtype: str) -> dict:
  """Peak resident memory of one sharded load of `ckpt` on `spec` (8 CPU devices: the devices'
  arrays live in this process): the kernel's high-water mark (VmHWM), reset right before the load
  (`/proc/self/clear_refs` 5), against the RSS before it; plus the final shard bytes (every
  device's buffer), the largest tensor in the leaf dtype, and the load time."""
  import gc
  import math
  import time
  import jax
  import llada_jax
  from llada_jax import parallel
  from llada_jax.checkpoint import hf
  from llada_jax.model.params import leaf_dtype

  assert jax.device_count() == 8, jax.devices()
  dtype = None if dtype == "none" else dtype
  mesh = parallel.make_mesh(spec)
  # One-time runtime setup (transfers, array creation) outside the measurement.
  _, warm = llada_jax.load_hf_checkpoint(os.path.join(FIXTURES, "llada2_tiny"), dtype=dtype,
                                         mesh=mesh)
  jax.block_until_ready(warm)
  del warm
  gc.collect()
  before = _memory_status()["VmRSS"]
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  t0 = time.perf_counter()
  c, params = llada_jax.load_hf_checkpoint(ckpt, dtype=dtype, mesh=mesh)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  peak = _memory_status()["VmHWM"]
  leaves = jax.tree_util.tree_leaves(params)
  return dict(growth=peak - before, before=before, seconds=round(seconds, 2),
              shard_bytes=sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
              param_bytes=sum(x.nbytes for x in leaves),
              largest=max(math.prod(t.shape) * leaf_dtype(c, t.path).itemsize
                          for t in hf.hf_tensor_table(c)))


def main() -> None:
  check, argv = sys.argv[1], sys.argv[2:]
  if check == "sharded":
    result = check_sharded(argv[0])
  elif check == "write_random":
    result = check_write_random(argv[0])
  elif check == "memory":
    result = check_memory(*argv)
  elif check == "hub":
    result = check_hub(argv[0])
  elif check == "multihost":
    result = check_multihost(argv)
  else:
    raise SystemExit(f"unknown check {check!r}")
  print(json.dumps(result, default=str))


# ---- the tests (pytest side) ---------------------------------------------------------------------
def _env(**extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  return env


def _run(check: str, *args: str, env: dict, timeout: int = 400) -> dict:
  p = subprocess.run([sys.executable, os.path.abspath(__file__), check, *args],
                     capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict:
  env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  return _run("sharded", str(tmp_path_factory.mktemp("sharded")), env=env)


LOADS = [(n, None) for n in FIXTURE_NAMES + ("bf16_2shards",)] + [
    ("llada2_tiny", "bfloat16"), ("bf16_2shards", "float32")]


@pytest.mark.parametrize("spec,rules", CASES, ids=lambda x: x if isinstance(x, str) else
                         ("custom" if x else "default"))
@pytest.mark.parametrize("ckpt,dtype", LOADS, ids=lambda x: str(x))
def test_sharded_load(sharded_results, ckpt, dtype, spec, rules):
  """Every param is a jax.Array in the rules' NamedSharding with the unsharded load's exact
  values and dtype on every device (each replica in its own buffer); the process read every
  distinct block once (replicas share the read), exactly its bytes in the file's dtype: with
  all 8 devices local, every tensor of the checkpoint exactly once."""
  r = sharded_results[_case_name(ckpt, dtype, spec, rules)]
  assert r["problems"] == []
  assert r["config_equal"]
  n_leaves = r["leaf_count"]
  assert len(r["leaves"]) == n_leaves
  assert r["read_shard_calls"] == sum(leaf["shards"] for leaf in r["leaves"].values())
  assert sorted(r["per_device_block"]) == [str(i) for i in range(8)]
  if dtype is None:  # the layout: every device holds its share of the params
    assert set(r["per_device_block"].values()) == {r["param_bytes_per_device"]}
  for name, leaf in r["leaves"].items():  # each slice read once, whatever the replication
    assert leaf["reads"] == leaf["shards"], name
    assert leaf["read"] == leaf["size"], name
  assert r["total_read"] == sum(leaf["size"] for leaf in r["leaves"].values())


def test_sharded_load_layouts(sharded_results):
  """The meshes really shard: some leaves are fully replicated (one read for all 8 devices), the
  experts are cut 4 ways on data=2,expert=4 (each block read once for its 2 devices) and 8 ways
  with the custom rules."""
  default = sharded_results[_case_name("llada2_tiny", None, "data=2,expert=4", None)]["leaves"]
  assert default["final_norm"]["replicas"] == 8
  assert default["final_norm"]["max_devices_per_block"] == 8
  assert default["final_norm"]["reads"] == 1
  assert default["final_norm"]["read"] == default["final_norm"]["size"]
  assert default["moe.experts.gate"]["spec"] == "P(None, 'expert')"
  assert default["moe.experts.gate"]["replicas"] == 2
  assert default["moe.experts.gate"]["reads"] == 4
  assert default["moe.experts.gate"]["read"] == default["moe.experts.gate"]["size"]
  custom = sharded_results[_case_name("llada2_tiny", None, *CASES[2])]["leaves"]
  assert custom["moe.experts.gate"]["spec"] == "P(None, ('data', 'expert'))"
  assert custom["moe.experts.gate"]["replicas"] == 1
  assert custom["moe.experts.gate"]["reads"] == 8
  assert custom["moe.experts.gate"]["read"] == custom["moe.experts.gate"]["size"]
  assert custom["embed"]["spec"] == "P(('expert', 'data'),)"
  tp = sharded_results[_case_name("llada2_tiny", None, *CASES[1])]
  assert tp["leaves"]["moe.experts.down"]["spec"] == (
      "P(None, 'expert', 'tensor', 'fsdp')")
  assert sharded_results["bf16_files"] == [
      "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json"]


def test_sharded_save(sharded_results):
  """Sharded params save to files byte-identical to the unsharded save (and, fp32, to the fixture
  itself); the unsharded reload is bit-identical; tensors are gathered one at a time."""
  saves = sharded_results["saves"]
  assert len(saves) == 3 * len(CASES) * 2  # (2 fixtures + bf16_2shards) x meshes x formats
  for name, s in saves.items():
    assert s["files_identical"], name
    assert s["config_equal"] and s["reload_problems"] == [], name
    assert s["tensors_gathered"] == s["tensors"], name
    assert s["max_gathered_bytes"] == s["max_tensor_bytes"], name
    if name.endswith("|same"):
      assert s["files"] == ["model.safetensors"], name
      assert s["fixture_identical"] == (name.split("|")[0] in FIXTURE_NAMES), name
    else:
      assert s["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json"], name


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> tuple[str, dict]:
  ckpt = str(tmp_path_factory.mktemp("random") / "ckpt")
  return ckpt, _run("write_random", ckpt, env=_env(), timeout=300)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("spec,dtype", MEMORY_CASES, ids=lambda x: str(x))
def test_sharded_load_peak_memory(random_checkpoint, spec, dtype):
  """A sharded load of a ~190 MB checkpoint on 8 CPU devices holds, at its peak, no more than
  the final shards plus the largest tensor plus a small slack: no mapped checkpoint files (the
  whole checkpoint's pages stayed resident when every file was mapped for the whole load), no
  host copy besides the block being read."""
  ckpt, written = random_checkpoint
  assert written["bytes"] > 180e6 and written["largest"] == 32 << 20
  assert len(written["files"]) > 3  # several shard files, all used by the load
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = _run("memory", ckpt, spec, dtype or "none", env=env, timeout=300)
  print(f"{spec} dtype={dtype}: {r}")
  # The measurement sees the params (each replica is its own buffer) ...
  assert r["growth"] >= 0.9 * r["shard_bytes"], r
  assert r["shard_bytes"] > 1.25 * r["param_bytes"], r
  # ... and nothing much besides them.
  assert r["growth"] <= r["shard_bytes"] + r["largest"] + MEMORY_SLACK, r


def test_tensor_reader_slices(tmp_path):
  """`TensorReader.read_into` copies exactly `tensor[index]` (transposed, cast) for random
  slices of every dtype and rank, across windows of a few rows (`chunk_bytes`), and leaves no
  file mapped; bytes reported are the slice's bytes in the file's dtype."""
  import ml_dtypes
  import numpy as np
  from safetensors import safe_open
  from safetensors.numpy import save_file
  from llada_jax.checkpoint import sharded
  rng = np.random.default_rng(0)
  tensors = {
      "a": rng.standard_normal((37, 50)).astype(np.float32),
      "b": rng.standard_normal((64, 24)).astype(ml_dtypes.bfloat16),
      "c": rng.standard_normal((41,)).astype(np.float16),
      "d": rng.standard_normal((6, 5, 7)).astype(ml_dtypes.bfloat16),
      "e": np.zeros((0, 3), np.float32),
  }
  file = str(tmp_path / "t.safetensors")
  save_file(tensors, file)
  files = {k: file for k in tensors}

  def mapped():
    with open("/proc/self/maps") as f:
      return sum(file in line for line in f)

  with safe_open(file, "numpy") as f:
    stored = {name: f.get_tensor(name) for name in tensors}
  checked = 0
  with sharded.TensorReader(files, chunk_bytes=300) as reader:
    for name in tensors:
      assert reader.read(name).tobytes() == stored[name].tobytes(), name
    for name, x in tensors.items():
      for _ in range(12):
        index = []
        for n in x.shape:
          a = int(rng.integers(0, n + 1))
          index.append(slice(a, int(rng.integers(a, n + 1))))
        index = tuple(index)
        want = x[index]
        got = reader.read(name, index)
        assert got.dtype == x.dtype and got.tobytes() == want.tobytes(), (name, index)
        for transpose in (False, True):
          for dtype in (np.float32, ml_dtypes.bfloat16):
            ref = (want.T if transpose else want).astype(dtype)
            out = np.full(ref.shape, 7, dtype)
            n = reader.read_into(name, index, out, transpose)
            assert n == want.size * x.dtype.itemsize
            assert out.tobytes() == ref.tobytes(), (name, index, transpose, dtype)
            checked += 1
      if mapped():
        raise AssertionError(f"{file} still mapped after reading {name}")
  assert checked == len(tensors) * 12 * 4


def test_sharded_load_validates_before_reading(tmp_path, monkeypatch):
  """A broken checkpoint fails with today's one-line error before any device block is read."""
  from safetensors.numpy import load_file, save_file
  from llada_jax import parallel
  from llada_jax.checkpoint import hf, sharded
  ckpt = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "llada2_tiny"), ckpt)
  tensors = load_file(ckpt / "model.safetensors")
  del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
  tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1]
  save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})

  def no_reads(*args):
    raise AssertionError("read before validation")

  monkeypatch.setattr(sharded, "read_shard", no_reads)
  with pytest.raises(ValueError) as e:
    hf.load_hf_checkpoint(ckpt, mesh=parallel.make_mesh("data=1"))
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing: model.layers.2.mlp.experts.3.up_proj.weight" in msg
  assert "wrong shape: lm_head.weight expected (512, 64) got (511, 64)" in msg


def _hub_cache(root) -> str:
  """A Hugging Face cache in `root` holding the tiny fixture as `HUB_ID` (refs/main -> commit)."""
  repo = os.path.join(root, "models--" + HUB_ID.replace("/", "--"))
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(HUB_COMMIT)
  snapshot = os.path.join(repo, "snapshots", HUB_COMMIT)
  os.makedirs(snapshot)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(FIXTURES, "llada2_tiny", name), snapshot)
  return snapshot


def test_load_by_hub_id_offline(tmp_path):
  """`inclusionAI/...` resolves through the local hub cache (HF_HUB_OFFLINE=1) and loads the same
  params as the directory; ids not in the cache and paths that are no ids fail in one line."""
  snapshot = _hub_cache(tmp_path / "hub")
  r = _run("hub", snapshot, env=_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"),
           timeout=200)
  assert r["resolved"] == snapshot
  assert r["config_equal"] and r["params_equal"] and r["local_dir_unchanged"]
  missing = r["inclusionAI/not-in-the-cache"]
  assert missing.startswith("no such checkpoint directory: inclusionAI/not-in-the-cache (as a "
                            "Hugging Face hub id: "), missing
  assert "\n" not in missing
  assert r["no/such/dir"] == "no such checkpoint directory: no/such/dir"


def test_resolve_checkpoint_local(tmp_path):
  """Existing directories come back unchanged; a missing path that is no hub id fails at once."""
  from llada_jax.checkpoint import is_hub_id, resolve_checkpoint
  fixture = os.path.join(FIXTURES, "llada2_tiny")
  assert resolve_checkpoint(fixture) == fixture
  assert resolve_checkpoint(tmp_path) == str(tmp_path)
  for bad in (str(tmp_path / "nope"), "./nope", "a/b/c", "owner/", "-x/y", "a--b/c"):
    with pytest.raises(ValueError, match="^no such checkpoint directory: "):
      resolve_checkpoint(bad)
  assert is_hub_id("inclusionAI/LLaDA2.1-mini") and is_hub_id("a/b")
  too_long = "x" * 60 + "/" + "y" * 40
  assert not any(map(is_hub_id, ("/abs/x", "a/b/c", "a", "a/.b", "a/b.", too_long)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes(tmp_path):
  """2 processes x 4 CPU devices, mesh expert=8: each process reads exactly the blocks of its own
  4 devices (none fully addressable), each once: half of every expert leaf, a replicated leaf
  once for its 4 devices;
  the sharded save is written by process 0 alone and equals the fixture file byte for byte."""
  env = _env(XLA_FLAGS=FAST_COMPILE)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "multihost",
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i), "--local_device_count", "4", "--out", str(tmp_path)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  res = [json.load(open(tmp_path / f"process{i}.json")) for i in range(2)]
  assert [len(r["local_devices"]) for r in res] == [4, 4]
  assert not set(res[0]["local_devices"]) & set(res[1]["local_devices"])
  for r in res:
    assert r["problems"] == [], r["problems"]
    assert r["fully_addressable_leaves"] == 0
    assert sorted(map(int, r["per_device_block"])) == r["local_devices"]
    assert set(r["per_device_block"].values()) == {r["param_bytes_per_device"]}
    experts, norm = r["leaves"]["moe.experts.gate"], r["leaves"]["final_norm"]
    assert experts["spec"] == "P(None, 'expert')"
    assert experts["reads"] == 4 and experts["read"] * 2 == experts["size"]
    assert norm["max_devices_per_block"] == 4  # replicated: read once for the 4 local devices
    assert norm["reads"] == 1 and norm["read"] == norm["size"]
  assert res[0]["saved_files"] == ["config.json", "model.safetensors"]
  assert res[0]["fixture_identical"]
  assert sorted(os.listdir(tmp_path)) == ["process0.json", "process1.json", "saved"]


if __name__ == "__main__":
  main()
