"""Expert parallelism for the LLaDA2 MoE layer with `jax.shard_map`.

Plugged into `llada_jax.model.moe.moe_block` as a "combined" expert implementation
(`moe_impl="ep"` / `"ep_ragged"`, or a name from `register_ep(EPConfig(...))`): routing and the
shared expert stay outside (GSPMD, token-local); this module moves each token's K copies to the
devices holding their experts, runs the grouped matmuls there, brings the results back and
combines them with the routing weights.

Layout inside the `shard_map` (mesh taken from `jax.set_mesh`, axis sizes from the rules):
  * experts `[E, D, F]` are split over the `expert` rule's mesh axes (E_loc = E / ep experts per
    device), their hidden dim D over the `embed` axes (FSDP: all-gathered here) and F over the
    `expert_mlp` axes (tensor parallel: partial outputs, one `psum` after the combine);
  * tokens `[N, D]` are split over every other mesh axis of size > 1 (data, fsdp, expert), so the
    token sets of the devices along the expert axes are disjoint, as `all_to_all` needs. N is
    padded to a multiple of that split; padding tokens are never dispatched.

Two dispatch paths (`EPConfig.dispatch`):
  * "dense": a capacity-`C` buffer per (expert, source device) `[E, C, D]`, exchanged with
    `lax.all_to_all`, grouped matmul, `all_to_all` back. Runs on every backend. With
    `capacity_factor=0` C is the worst case (every local token picks the same expert: C = n), so
    the path is dropless; otherwise C = ceil(capacity_factor * n * K / E) and token copies past C
    are dropped (their output is 0) and counted in the stats.
  * "ragged": the token copies sorted by expert and sent with `lax.ragged_all_to_all` (exactly
    the rows each device needs), regrouped by local expert, grouped matmul, and sent back the
    same way. The receive buffer holds the worst case with `capacity_factor=0` (dropless: every
    peer sends all its copies to one device), else capacity_factor * n * K rows; sources fill it
    in device order and rows past its end are dropped and counted. `ragged_all_to_all` has no
    CPU implementation (it is checked by TPU lowering); `emulate_ragged=True` swaps in an
    all_gather-based equivalent so the offsets arithmetic is tested on CPU.

Grouped matmul (`EPConfig.gmm`): "ragged_dot" (`lax.ragged_dot`), "einsum" (dense path only:
a batched einsum over the capacity buffer; what `moe_impl="auto"` runs off TPU as "ep_einsum":
XLA:CPU expands `ragged_dot` into a masked dense matmul over every group, E_loc times the work
and an `[M, E_loc * D]` buffer), or "megablox" (the Pallas TPU kernel
`jax.experimental.pallas.ops.tpu.megablox.gmm`; interpreted on CPU).

Load-balance statistics come back with the output: `tokens_per_expert` `[E]` (global count of
token copies routed to each expert, padding excluded) and `dropped` `[]` (copies over capacity).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from llada_jax.model import moe as moe_lib
from llada_jax.parallel.mesh import mesh_shape
from llada_jax.parallel.rules import Rules, logical_to_spec, normalize_rules, spec_axes

DISPATCHES = ("dense", "ragged")
GMMS = ("ragged_dot", "einsum", "megablox")


@dataclasses.dataclass(frozen=True)
class EPConfig:
  """How the MoE layer is distributed (hashable: it names a compiled program)."""

  dispatch: str = "dense"
  capacity_factor: float = 0.0  # 0 = worst-case buffers (dropless)
  gmm: str = "ragged_dot"
  rules: Rules = dataclasses.field(default_factory=normalize_rules)
  emulate_ragged: bool = False  # ragged dispatch via all_gather (CPU tests of the ragged path)

  def __post_init__(self):
    object.__setattr__(self, "rules", normalize_rules(self.rules))
    self.validate()

  def validate(self) -> None:
    def bad(msg):
      raise ValueError(f"invalid expert-parallel config: {msg}")
    if self.dispatch not in DISPATCHES:
      bad(f"dispatch {self.dispatch!r} (choose from {', '.join(DISPATCHES)})")
    if self.gmm not in GMMS:
      bad(f"gmm {self.gmm!r} (choose from {', '.join(GMMS)})")
    if not isinstance(self.capacity_factor, (int, float)) or self.capacity_factor < 0:
      bad(f"capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor!r}")
    if self.dispatch == "ragged" and self.gmm == "einsum":
      bad("gmm 'einsum' needs the dense dispatch's fixed-size buffers")

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> "EPConfig":
    """From a parallel config (`llada_jax.parallel.mesh.default_parallel_config`)."""
    kw = dict(dispatch=cfg.moe.dispatch, capacity_factor=float(cfg.moe.capacity_factor),
              gmm=cfg.moe.gmm, rules=normalize_rules(cfg.rules))
    kw.update(overrides)
    return cls(**kw)


def capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per (expert, source device) for `tokens` local tokens with top-`k` routing.

  Each token picks an expert at most once, so `tokens` slots can never overflow (dropless)."""
  if not capacity_factor:
    return max(tokens, 1)
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def _context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("expert parallelism needs a mesh: call under `jax.set_mesh(mesh)` "
                     "(see llada_jax.parallel.make_mesh)")
  return mesh


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static facts of one expert-parallel call."""

  num_experts: int
  expert_axes: tuple[str, ...]  # experts split over these (all_to_all axes)
  embed_axes: tuple[str, ...]  # weights' D split over these (all-gathered)
  mlp_axes: tuple[str, ...]  # weights' F split over these (psum)
  token_axes: tuple[str, ...]  # tokens split over these
  ep: int  # expert shards
  capacity: int  # dense: slots per (expert, source); ragged: receive-buffer rows


def expert_parallel_moe(x: jax.Array, idx: jax.Array, w: jax.Array, gate: jax.Array,
                        up: jax.Array, down: jax.Array, cfg: EPConfig = EPConfig(), mesh=None):
  """Routed experts and their combine, distributed over `mesh` (default: the context mesh).

  Args:
    x: `[N, D]` tokens. idx: `[N, K]` int32 chosen experts. w: `[N, K]` float32 combine weights.
    gate, up: `[E, D, F]`; down: `[E, F, D]` (one layer's experts).
  Returns:
    y `[N, D]` float32 = sum_k w[:, k] * expert_{idx[:, k]}(x), and the stats dict
    (`tokens_per_expert` [E] int32, `dropped` [] int32 copies over capacity, `capacity` []
    int32: slots per (expert, source device) of the dense path, receive-buffer rows per device
    of the ragged path).
  """
  mesh = _context_mesh() if mesh is None else mesh
  sizes = mesh_shape(mesh)
  n_all, k = idx.shape
  e = gate.shape[0]
  gspec = tuple(logical_to_spec(("expert", "embed", "expert_mlp"), gate.shape, sizes,
                                cfg.rules))
  gspec = gspec + (None,) * (3 - len(gspec))
  e_axes, d_axes, f_axes = (spec_axes(a) for a in gspec)
  token_axes = tuple(a for a in mesh.axis_names if sizes[a] > 1 and a not in f_axes)
  shards = math.prod(sizes[a] for a in token_axes)
  pad = (-n_all) % shards
  valid = jnp.ones((n_all,), bool)
  if pad:
    padding = lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
    x, idx, w, valid = padding(x), padding(idx), padding(w), padding(valid)
  n_local = (n_all + pad) // shards
  ep = math.prod(sizes[a] for a in e_axes)
  if cfg.dispatch == "dense":
    cap = capacity(n_local, k, e, cfg.capacity_factor)
  else:
    cap = ragged_buffer_rows(n_local, k, ep, e // ep, cfg.capacity_factor)
  layout = _Layout(num_experts=e, expert_axes=e_axes, embed_axes=d_axes, mlp_axes=f_axes,
                   token_axes=token_axes, ep=ep, capacity=cap)
  tok = _entry(token_axes)
  w_spec = P(*gspec)
  down_spec = P(gspec[0], gspec[2], gspec[1])
  body = functools.partial(_local_moe, cfg=cfg, layout=layout)
  # The megablox Pallas kernel declares its outputs without varying-axes types, which the vma
  # check rejects; its path runs unchecked (tested to give the same values and gradients).
  y, tokens_per_expert, dropped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(P(tok, None), P(tok, None), P(tok, None), P(tok), w_spec, w_spec, down_spec),
      out_specs=(P(tok, None), P(), P()), check_vma=cfg.gmm != "megablox",
  )(x, idx, w.astype(jnp.float32), valid, gate, up, down)
  stats = {"tokens_per_expert": tokens_per_expert, "dropped": dropped,
           "capacity": jnp.asarray(layout.capacity, jnp.int32)}
  return y[:n_all], stats


def _local_moe(x, idx, w, valid, gate, up, down, *, cfg: EPConfig, layout: _Layout):
  """Per-device body: x `[n, D]`, idx/w `[n, K]`, valid `[n]`, local experts `[E_loc, D', F']`
  (D' and F' the local shards of D and F)."""
  if layout.embed_axes:  # FSDP: gather the hidden dim of the local experts
    gate = lax.all_gather(gate, layout.embed_axes, axis=1, tiled=True)
    up = lax.all_gather(up, layout.embed_axes, axis=1, tiled=True)
    down = lax.all_gather(down, layout.embed_axes, axis=2, tiled=True)
  n, k = idx.shape
  e = layout.num_experts
  # Expert id per token copy; padding copies get the sentinel e (never dispatched).
  key = jnp.where(jnp.repeat(valid, k), idx.reshape(-1), e)
  counts = jnp.bincount(key, length=e + 1)
  if cfg.dispatch == "dense":
    out, dropped = _dense_dispatch(x, key, counts, gate, up, down, cfg, layout)
  else:
    out, dropped = _ragged_dispatch(x, key, counts, gate, up, down, cfg, layout)
  y = jnp.einsum("nkd,nk->nd", out.reshape(n, k, -1).astype(jnp.float32), w)
  if layout.mlp_axes:  # tensor-parallel experts: sum the partial products over F
    y = lax.psum(y, layout.mlp_axes)
  tokens_per_expert = counts[:e].astype(jnp.int32)
  if layout.token_axes:
    tokens_per_expert = lax.psum(tokens_per_expert, layout.token_axes)
    dropped = lax.psum(dropped, layout.token_axes)
  return y, tokens_per_expert, dropped


def _rank_among_equal(key: jax.Array, counts: jax.Array) -> jax.Array:
  """Each element's rank among the elements with the same key, in original order
  (`counts` = bincount of `key`)."""
  order = jnp.argsort(key, stable=True)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(key.shape[0], dtype=key.dtype) - starts[key[order]]
  return jnp.zeros_like(key).at[order].set(rank_sorted.astype(key.dtype))


def _dense_dispatch(x, key, counts, gate, up, down, cfg: EPConfig, layout: _Layout):
  """Capacity buffers `[E, C, D]` through `all_to_all`; returns (copies `[n*K, D]`, dropped)."""
  e, cap, ep = layout.num_experts, layout.capacity, layout.ep
  e_loc, d = gate.shape[0], x.shape[1]
  k = key.shape[0] // x.shape[0]
  pos = _rank_among_equal(key, counts)
  real = key < e
  keep = real & (pos < cap)
  dropped = jnp.sum(real & ~keep).astype(jnp.int32)
  slot = jnp.where(keep, key * cap + pos, e * cap)  # e * cap: out of range, dropped
  rows = x[jnp.arange(key.shape[0]) // k]
  buf = jnp.zeros((e * cap, d), x.dtype).at[slot].set(rows, mode="drop")
  if ep > 1:  # rows for expert shard j go to device j; received rows are source-major
    buf = lax.all_to_all(buf, layout.expert_axes, 0, 0, tiled=True)
  buf = buf.reshape(ep, e_loc, cap, d).transpose(1, 0, 2, 3).reshape(e_loc, ep * cap, d)
  out = _grouped_ffn_uniform(buf, gate, up, down, cfg.gmm)
  out = out.reshape(e_loc, ep, cap, d).transpose(1, 0, 2, 3).reshape(e * cap, d)
  if ep > 1:
    out = lax.all_to_all(out, layout.expert_axes, 0, 0, tiled=True)
  copies = jnp.where(keep[:, None], out[jnp.minimum(slot, e * cap - 1)], 0)
  return copies, dropped


def ragged_buffer_rows(tokens: int, k: int, ep: int, experts_per_device: int,
                       capacity_factor: float) -> int:
  """Receive-buffer rows of the ragged dispatch for `tokens` local tokens: the worst case
  (every peer sends all its copies here) or, with a capacity factor, cf * tokens * K."""
  worst = ep * tokens * min(k, experts_per_device)
  if not capacity_factor:
    return max(worst, 1)
  return max(1, min(worst, math.ceil(capacity_factor * tokens * k)))


def _ragged_dispatch(x, key, counts, gate, up, down, cfg: EPConfig, layout: _Layout):
  """Exact-size exchange with `ragged_all_to_all`; returns (copies `[n*K, D]`, dropped).

  Each device receives into a buffer of `layout.capacity` rows: sources fill it in device
  order, each with its rows sorted by expert; rows past the end are not sent (dropped)."""
  e, ep = layout.num_experts, layout.ep
  e_loc, d = gate.shape[0], x.shape[1]
  nk = key.shape[0]
  k = nk // x.shape[0]
  order = jnp.argsort(key, stable=True)
  xs = x[order // k]  # copies sorted by expert = by destination device; padding last
  if ep == 1:
    ys = _grouped_ffn(xs, counts[:e].astype(jnp.int32), gate, up, down, cfg.gmm)
    return jnp.zeros_like(ys).at[order].set(ys), jnp.zeros((), jnp.int32)
  a2a = _ragged_all_to_all_emulated if cfg.emulate_ragged else lax.ragged_all_to_all
  axes = layout.expert_axes
  m = layout.capacity
  me = lax.axis_index(axes)
  per_dest = counts[:e].astype(jnp.int32).reshape(ep, e_loc)  # [dst, E_loc]
  input_offsets = jnp.cumsum(per_dest.sum(1)) - per_dest.sum(1)
  every = lax.all_gather(per_dest, axes)  # [src, dst, E_loc]
  sent = every.sum(-1)  # [src, dst] rows each source has for each destination
  start = jnp.cumsum(sent, 0) - sent  # where they begin in the destination's buffer
  fit = jnp.clip(m - start, 0, sent)  # how many of them fit
  send_sizes, output_offsets = fit[me], start[me]
  recv_sizes = fit[:, me]  # [src]
  dropped = jnp.sum(sent[me] - send_sizes).astype(jnp.int32)
  recv = a2a(xs, jnp.zeros((m, d), x.dtype), input_offsets, send_sizes, output_offsets,
             recv_sizes, axis_name=axes)
  # Received rows are grouped by source, then by local expert (truncated to what fitted):
  # regroup them by local expert for the grouped matmul.
  from_src = every[:, me, :]  # [src, E_loc]
  before = jnp.cumsum(from_src, 1) - from_src
  recv_counts = jnp.clip(recv_sizes[:, None] - before, 0, from_src)
  seg_end = jnp.cumsum(recv_counts.reshape(-1))
  seg = jnp.searchsorted(seg_end, jnp.arange(m, dtype=jnp.int32), side="right")
  local_expert = jnp.where(seg < ep * e_loc, seg % e_loc, e_loc)
  perm = jnp.argsort(local_expert, stable=True)
  ys = _grouped_ffn(recv[perm], recv_counts.sum(0), gate, up, down, cfg.gmm)
  ys = jnp.zeros_like(ys).at[perm].set(ys)
  back_offsets = lax.all_to_all(input_offsets, axes, 0, 0, tiled=True)  # src's offset for me
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
  back = a2a(ys, jnp.zeros((nk, d), ys.dtype), recv_offsets, recv_sizes, back_offsets,
             send_sizes, axis_name=axes)
  return jnp.zeros_like(back).at[order].set(back), dropped


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """`lax.ragged_all_to_all` (one slice per peer) from `all_gather`: for backends without it."""
  del recv_sizes  # implied by the senders' send_sizes
  me = lax.axis_index(axis_name)
  operands = lax.all_gather(operand, axis_name)  # [P, N, ...]
  in_off = lax.all_gather(input_offsets, axis_name)  # [src, dst]
  sizes = lax.all_gather(send_sizes, axis_name)
  out_off = lax.all_gather(output_offsets, axis_name)
  j = jnp.arange(output.shape[0])
  result = output
  for s in range(operands.shape[0]):
    lo, size, src = out_off[s, me], sizes[s, me], in_off[s, me]
    inside = (j >= lo) & (j < lo + size)
    rows = operands[s][jnp.clip(src + j - lo, 0, operand.shape[0] - 1)]
    result = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), rows, result)
  return result


# ---- grouped matmuls ----------------------------------------------------------------------------
def _swiglu_grouped(mm, xs, gate, up, down):
  return mm(jax.nn.silu(mm(xs, gate)) * mm(xs, up), down)


def _megablox(lhs, rhs, sizes):
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # noqa: PLC0415 (optional, heavy)
  m, kd = lhs.shape
  n = rhs.shape[2]
  tiling = (min(128, m), min(128, kd), min(128, n))
  return gmm(lhs, rhs, sizes, lhs.dtype, tiling, interpret=jax.default_backend() != "tpu")


def _grouped_ffn(xs, sizes, gate, up, down, gmm: str):
  """SwiGLU experts on rows `xs` `[M, D]` grouped by expert (`sizes` `[E_loc]`, sum <= M)."""
  sizes = sizes.astype(jnp.int32)
  if gmm == "megablox":
    mm = lambda a, b: _megablox(a, b, sizes)
  else:
    mm = lambda a, b: lax.ragged_dot(a, b, sizes)
  return _swiglu_grouped(mm, xs, gate, up, down)


def _grouped_ffn_uniform(buf, gate, up, down, gmm: str):
  """SwiGLU experts on `[E_loc, M, D]` (row block g goes through expert g)."""
  g, m, d = buf.shape
  if gmm == "einsum":
    mm = lambda a, b: jnp.einsum("gmd,gdf->gmf", a, b)
    return _swiglu_grouped(mm, buf, gate, up, down)
  sizes = jnp.full((g,), m, jnp.int32)
  return _grouped_ffn(buf.reshape(g * m, d), sizes, gate, up, down, gmm).reshape(g, m, -1)


# ---- registration as a moe_impl -----------------------------------------------------------------
_BUILTIN = {"ep": EPConfig(), "ep_ragged": EPConfig(dispatch="ragged"),
            "ep_einsum": EPConfig(gmm="einsum")}
_REGISTERED: dict[EPConfig, str] = {}


def register_ep(cfg: EPConfig, name: str | None = None) -> str:
  """Registers `cfg` as a `moe_impl` and returns its name (default: derived from the config,
  so one name always means one program and jit caches stay valid)."""
  if name is None:
    name = _REGISTERED.get(cfg)
    if name is None:
      name = "ep_" + hashlib.sha1(repr(cfg).encode()).hexdigest()[:10]
  fn = functools.partial(expert_parallel_moe, cfg=cfg)
  moe_lib.register_combined_experts(name, fn)
  _REGISTERED[cfg] = name
  return name


for _name, _cfg in _BUILTIN.items():
  register_ep(_cfg, _name)
