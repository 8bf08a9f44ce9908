"""Continuous batching for block-diffusion decoding.

The engine keeps `slots` rows of the decode loop's state (`llada_jax.decode.generate.Carry`:
canvas, KV cache, per-row block pointers and counters) on the device. Its thread repeats:

  1. admit: each waiting request takes a free slot: its prompt blocks are prefilled into that
     row of the cache (one `[1, P]` forward, P the request's prompt bucket) and its row state is
     reset; the other rows are not touched;
  2. advance: the compiled decode loop runs on all slots for at most `chunk` iterations, and
     returns as soon as a row finishes (so its slot is free at once);
  3. report: each request gets the tokens of the blocks it committed since the last report
     (its stream) and, when its row is done, its result; the slot is freed.

A short request admitted while a long one decodes therefore finishes first. Cancelled requests
(e.g. a client that disconnected) leave at the next report.

Per request: the prompt, `max_tokens` (the row's generation length), the seed, and the per-row
knobs (`ROW_KNOBS`: the mode's thresholds, post-steps, fill count, steps, early stop, EOS id). The
engine's `DecodeSettings` fix the rest for every row (`STATIC_FIELDS`: algorithm, block length,
editing window, sampling temperature / top-k / top-p and the special ids); a request that asks
for another value of one of them is refused with one line naming it.

A row's tokens equal `llada_jax.generate` of its prompt alone with the same settings: the same
loop body and prefill; only the batch around it differs (row i samples with key
fold_in(PRNGKey(seed), 0), as row 0 of a one-prompt `generate`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import parallel
from llada_jax.config import ModelConfig
from llada_jax.decode.api import finish_status, prompt_bucket
from llada_jax.decode.generate import Carry, Knobs, StaticSpec, init_carry, loop_body, prefill_kv
from llada_jax.decode.settings import DecodeSettings
from llada_jax.errors import InputError
from llada_jax.model.transformer import resolve_attention

ROW_KNOBS = ("threshold", "editing_threshold", "max_post_steps", "num_to_transfer", "steps",
             "eos_early_stop", "eos_id")
STATIC_FIELDS = ("algorithm", "block_length", "mbe_window", "temperature", "top_k", "top_p",
                 "mask_id")


@dataclasses.dataclass
class RowResult:
  """A finished request. `output_ids` end at the first EOS (included)."""

  output_ids: list[int]
  nfe: int
  fills: int
  edits: int
  finish: str  # "eos", "length", "budget", "cancelled" or "error"
  seconds: float  # from submission to the result
  queued_seconds: float  # from submission to admission
  error: str | None = None  # finish "error": what failed

  @property
  def tpf(self) -> float:
    return len(self.output_ids) / max(self.nfe, 1)


@dataclasses.dataclass(eq=False)
class Request:
  """One generation. `on_tokens(new_ids)` is called from the engine's thread with each
  committed stretch of tokens; `on_done(RowResult)` once, at the end (also when cancelled)."""

  prompt_ids: list[int]
  settings: DecodeSettings  # gen_length = max tokens
  on_tokens: Callable[[list[int]], None] | None = None
  on_done: Callable[[RowResult], None] | None = None
  # on_canvas(ids) after every report while the row decodes: its generation region, mask ids
  # included (the playground draws it)
  on_canvas: Callable[[list[int]], None] | None = None
  id: int = dataclasses.field(default_factory=itertools.count().__next__)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  # engine-side state
  admitted: float = 0.0
  sent: int = 0  # output tokens reported so far
  iterations: int = 0  # loop iterations while this request held its slot
  budget: int = 0

  def cancel(self) -> None:
    self.cancelled.set()


def _strip(carry: Carry) -> Carry:
  return carry.replace(params=None)


@functools.partial(jax.jit, static_argnames=("c", "spec", "batch"))
def _init(params, c: ModelConfig, spec: StaticSpec, batch: int, mask_id) -> Carry:
  """Every slot free (done), caches zero."""
  t = spec.canvas_length
  canvas = jnp.full((batch, t), mask_id, jnp.int32)
  zeros = jnp.zeros((batch,), jnp.int32)
  knobs = Knobs.from_settings(DecodeSettings()).replace(mask_id=jnp.asarray(mask_id, jnp.int32))
  carry = init_carry(params, c, canvas, zeros, jnp.zeros((batch, 2), jnp.uint32), knobs, spec,
                     gen_length=zeros)
  return _strip(carry.replace(done=jnp.ones((batch,), bool)))


@functools.partial(jax.jit, static_argnames=("c", "spec"), donate_argnames=("carry",))
def _admit(params, carry: Carry, c: ModelConfig, spec: StaticSpec, slot, row, prompt_len,
           gen_length, key, mask_id) -> Carry:
  """Puts one request into row `slot`: row `[T]` (prompt, then masks), its prompt blocks
  prefilled into that row of the cache (a `[1, P]` forward, P = spec.prompt_bucket)."""
  bl, pad = spec.block_length, (spec.mbe_window - 1) * spec.block_length
  first_block = (prompt_len // bl)[None]
  if spec.use_cache:
    kv = prefill_kv(params, c, spec, row[None, :spec.prompt_bucket], first_block)
    cache = jax.tree_util.tree_map(
        lambda old, new: jax.lax.dynamic_update_slice(
            old, jnp.swapaxes(new, 2, 3).astype(old.dtype), (0, slot, 0, 0, 0)),
        carry.cache, kv)
  else:
    cache = carry.cache
  canvas_row = jnp.concatenate([jnp.full((pad,), mask_id, jnp.int32), row])
  put = lambda x, v: x.at[slot].set(v)
  return carry.replace(
      canvas=jax.lax.dynamic_update_slice(carry.canvas, canvas_row[None], (slot, 0)),
      prompt_len=put(carry.prompt_len, prompt_len), first_block=put(carry.first_block,
                                                                    first_block[0]),
      num_blocks=put(carry.num_blocks, (prompt_len + gen_length + bl - 1) // bl),
      block=put(carry.block, first_block[0]), counter=put(carry.counter, 0),
      converged=put(carry.converged, False), done=put(carry.done, False), cache=cache,
      keys=put(carry.keys, key), nfe=put(carry.nfe, 0), fills=put(carry.fills, 0),
      edits=put(carry.edits, 0))


@functools.partial(jax.jit, static_argnames=("c", "spec"), donate_argnames=("carry",))
def _advance(params, carry: Carry, knobs: Knobs, c: ModelConfig, spec: StaticSpec,
             chunk) -> tuple[Carry, jax.Array]:
  """Up to `chunk` (traced) loop iterations on every slot; stops early when a row finishes.
  Returns the carry and the iterations run."""
  batch, t = carry.prompt_len.shape[0], spec.canvas_length
  body = loop_body(c, knobs, spec, batch, t)
  done0 = carry.done

  def cond(state):
    cr, i = state
    return jnp.any(~cr.done) & (i < chunk) & ~jnp.any(cr.done & ~done0)

  cr, i = jax.lax.while_loop(cond, lambda s: (body(s[0]), s[1] + 1),
                             (carry.replace(params=params), jnp.zeros((), jnp.int32)))
  return _strip(cr), i


@functools.partial(jax.jit, donate_argnames=("carry",))
def _release(carry: Carry, rows) -> Carry:
  """Marks `rows` `[B]` bool done (their slots free)."""
  return carry.replace(done=carry.done | rows)


class Engine:
  """Continuous batching over `slots` device rows (see the module doc).

  Args:
    params, config: the model (params placed on `mesh` already, or placed here).
    settings: the engine's `DecodeSettings`: `STATIC_FIELDS` hold for every request; the rest
      are defaults a request may override.
    slots: rows decoded together. max_length: canvas positions per row (prompt + generation,
      rounded up to blocks); default: the config's `max_position_embeddings`, at most 4096.
    chunk: loop iterations between reports (streaming granularity, admission latency).
  """

  def __init__(self, params, config: ModelConfig, *, settings: DecodeSettings | None = None,
               slots: int = 8, max_length: int | None = None, chunk: int = 8, mesh=None,
               rules=None, attention_impl: str = "auto", moe_impl: str = "auto",
               sampler_impl: str = "logits"):
    s = (settings or DecodeSettings.for_mode("quality")).with_ids(config.eos_token_id,
                                                                   config.mask_token_id)
    s.validate(config.vocab_size)
    if slots < 1 or chunk < 1:
      raise InputError(f"slots and chunk must be >= 1, got slots={slots}, chunk={chunk}")
    bl = s.block_length
    limit = min(config.max_position_embeddings, 4096) if max_length is None else max_length
    if limit > config.max_position_embeddings:
      raise InputError(f"max_length {limit} exceeds the model's max_position_embeddings "
                       f"({config.max_position_embeddings})")
    if limit < 2 * bl:
      raise InputError(f"max_length {limit} leaves no room for a prompt block and a "
                       f"generated block of {bl} tokens")
    self.config, self.settings, self.slots, self.chunk = config, s, slots, chunk
    self.max_length = limit // bl * bl
    self.mesh = parallel.resolve_mesh(mesh, config, rules=rules)
    self.spec = StaticSpec(
        canvas_length=self.max_length, prompt_bucket=bl, gen_length=bl, block_length=bl,
        algorithm=s.algorithm, mbe_window=s.mbe_window, greedy=s.temperature == 0,
        trajectory=0, attention_impl=resolve_attention(attention_impl),
        moe_impl=parallel.resolve_moe_impl(moe_impl, self.mesh, rules, dropless=True),
        sampler_impl=sampler_impl)
    with parallel.mesh_context(self.mesh):
      self.params = (params if self.mesh is None
                     else parallel.shard_params(params, config, self.mesh, rules))
      self._carry = _init(self.params, config, self.spec, slots, s.mask_id)
    self._rows: list[Request | None] = [None] * slots
    self._knobs = {k: np.zeros((slots,), np.float32 if "threshold" in k else
                               bool if k == "eos_early_stop" else np.int32) for k in ROW_KNOBS}
    self._queue: collections.deque[Request] = collections.deque()
    self._wake = threading.Condition()
    self._stop = False
    self._thread: threading.Thread | None = None
    self.stats = collections.Counter()  # admitted, finished, cancelled, errors, iterations, ...
    self.last_error: str | None = None

  # ---- requests ---------------------------------------------------------------------------------
  def check(self, prompt_ids: list[int], settings: DecodeSettings) -> None:
    """Raises one `InputError` when the request cannot run here (before it is queued)."""
    s = settings.with_ids(self.config.eos_token_id, self.config.mask_token_id)
    s.validate(self.config.vocab_size)
    for name in STATIC_FIELDS:
      if getattr(s, name) != getattr(self.settings, name):
        raise InputError(f"{name} is fixed by this server at {getattr(self.settings, name)!r} "
                         f"(the request asked for {getattr(s, name)!r})")
    if not prompt_ids:
      raise InputError("empty prompt")
    bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
    if bad:
      raise InputError(f"prompt token id {bad[0]} is outside the vocabulary "
                       f"(size {self.config.vocab_size})")
    need = len(prompt_ids) + s.gen_length
    if need > self.max_length:
      raise InputError(f"context too long: {len(prompt_ids)} prompt tokens + {s.gen_length} "
                       f"to generate = {need} > {self.max_length} (the server's max length)")

  def submit(self, request: Request) -> Request:
    """Queues `request` (checked first; raises `InputError`). Thread-safe."""
    self.check(request.prompt_ids, request.settings)
    request.settings = request.settings.with_ids(self.config.eos_token_id,
                                                 self.config.mask_token_id)
    with self._wake:
      if self._stop:
        raise InputError("the server is shutting down")
      self._queue.append(request)
      self._wake.notify()
    return request

  # ---- the loop ---------------------------------------------------------------------------------
  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._run, name="llada-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self, drain_seconds: float = 0.0) -> None:
    """Stops taking requests; lets running ones finish for up to `drain_seconds`, then cancels
    the rest (their `on_done` gets finish "cancelled")."""
    deadline = time.monotonic() + drain_seconds
    with self._wake:
      self._stop = True
      self._wake.notify()
    while self.busy() and time.monotonic() < deadline:
      time.sleep(0.02)
    with self._wake:
      for r in list(self._queue) + [r for r in self._rows if r is not None]:
        r.cancel()
      self._wake.notify()
    if self._thread is not None:
      self._thread.join()
    else:  # never started: nobody else will finish them
      with self._wake:
        left = list(self._queue) + [r for r in self._rows if r is not None]
        self._queue.clear()
      self._rows = [None] * self.slots
      for r in left:
        self._finish(r, [], 0, 0, 0, "cancelled")

  def busy(self) -> bool:
    return bool(self._queue) or any(r is not None for r in self._rows)

  def _run(self) -> None:
    while True:
      with self._wake:
        while not self.busy() and not self._stop:
          self._wake.wait()
        if self._stop and not self.busy():
          return
      self.step()

  def step(self) -> None:
    """One round: admit, advance, report (the engine thread's work; callable directly when
    no thread runs). An exception fails every request in the engine (finish "error", the
    message in `RowResult.error`) and resets the device state; the engine keeps serving."""
    try:
      self._admit_waiting()
      if any(r is not None for r in self._rows):
        self._advance()
    except Exception as e:  # noqa: BLE001 (reported to every client, then the engine resets)
      self._fail_all(f"{type(e).__name__}: {e}")

  def _fail_all(self, message: str) -> None:
    self.stats["errors"] += 1
    self.last_error = message
    with self._wake:
      victims = list(self._queue) + [r for r in self._rows if r is not None]
      self._queue.clear()
    self._rows = [None] * self.slots
    for r in victims:
      self._finish(r, [], 0, 0, 0, "error", error=message)
    with parallel.mesh_context(self.mesh):
      self._carry = _init(self.params, self.config, self.spec, self.slots,
                          self.settings.mask_id)

  def _next_live(self) -> Request | None:
    """The oldest queued request not cancelled (cancelled ones are finished on the way)."""
    while True:
      with self._wake:
        if not self._queue:
          return None
        r = self._queue.popleft()
      if not r.cancelled.is_set():
        return r
      self._finish(r, [], 0, 0, 0, "cancelled")

  def _admit_waiting(self) -> None:
    for slot in range(self.slots):
      if self._rows[slot] is not None:
        continue
      r = self._next_live()
      if r is None:
        return
      self._admit(slot, r)

  def _admit(self, slot: int, r: Request) -> None:
    s, bl = r.settings, self.settings.block_length
    p = len(r.prompt_ids)
    row = np.full((self.max_length,), s.mask_id, np.int32)
    row[:p] = r.prompt_ids
    spec = dataclasses.replace(self.spec, prompt_bucket=min(prompt_bucket(p, bl),
                                                            self.max_length))
    key = jax.random.fold_in(jax.random.PRNGKey(s.seed), 0)
    with parallel.mesh_context(self.mesh):
      self._carry = _admit(self.params, self._carry, self.config, spec, jnp.int32(slot),
                           jnp.asarray(row), jnp.int32(p), jnp.int32(s.gen_length), key,
                           jnp.int32(s.mask_id))
    for k in ROW_KNOBS:
      self._knobs[k][slot] = min(getattr(s, k), s.gen_length) if k == "steps" else getattr(s, k)
    # generate's budget for this prompt alone: its canvas's blocks
    blocks = prompt_bucket(p, bl) // bl + -(-s.gen_length // bl)
    r.budget = s.max_iterations or blocks * (s.mbe_window * bl + s.max_post_steps + 2) + 2
    r.admitted, r.sent, r.iterations = time.monotonic(), 0, 0
    self._rows[slot] = r
    self.stats["admitted"] += 1

  def _advance(self) -> None:
    s = self.settings
    k = self._knobs
    knobs = Knobs.from_settings(s).replace(
        threshold=jnp.asarray(k["threshold"]), editing_threshold=jnp.asarray(
            k["editing_threshold"]), max_post_steps=jnp.asarray(k["max_post_steps"]),
        num_to_transfer=jnp.asarray(k["num_to_transfer"]), steps=jnp.asarray(k["steps"]),
        eos_early_stop=jnp.asarray(k["eos_early_stop"]), eos_id=jnp.asarray(k["eos_id"])[:, None])
    # no row runs past its budget inside a chunk (its result would differ from generate's)
    left = min(r.budget - r.iterations for r in self._rows if r is not None)
    with parallel.mesh_context(self.mesh):
      self._carry, iters = _advance(self.params, self._carry, knobs, self.config, self.spec,
                                    jnp.int32(max(1, min(self.chunk, left))))
    cr = self._carry
    canvas, block, done, nfe, fills, edits = parallel.to_host(
        (cr.canvas, cr.block, cr.done, cr.nfe, cr.fills, cr.edits))
    iters = int(iters)
    self.stats["advances"] += 1
    self.stats["iterations"] += iters
    pad = (s.mbe_window - 1) * s.block_length
    release = np.zeros((self.slots,), bool)
    for slot, r in enumerate(self._rows):
      if r is None:
        continue
      r.iterations += iters
      p, g = len(r.prompt_ids), r.settings.gen_length
      out = canvas[slot, pad + p: pad + p + g].tolist()
      eos = r.settings.eos_id
      if eos in out:
        out = out[: out.index(eos) + 1]
      if done[slot] or r.cancelled.is_set() or r.iterations >= r.budget:
        if not done[slot]:
          release[slot] = True
        finish = ("cancelled" if r.cancelled.is_set() and not done[slot] else
                  finish_status(out, bool(done[slot]), r.settings))
        self._emit(r, out)
        self._finish(r, out, int(nfe[slot]), int(fills[slot]), int(edits[slot]), finish)
        self._rows[slot] = None
        continue
      committed = (int(block[slot]) - (s.mbe_window - 1)) * s.block_length - p
      if r.on_canvas is not None:
        r.on_canvas(canvas[slot, pad + p: pad + p + g].tolist())
      self._emit(r, out[:max(committed, 0)])
    if release.any():
      with parallel.mesh_context(self.mesh):
        self._carry = _release(self._carry, jnp.asarray(release))

  def _emit(self, r: Request, out: list[int]) -> None:
    if len(out) > r.sent:
      new, r.sent = out[r.sent:], len(out)
      if r.on_tokens is not None:
        r.on_tokens(new)

  def _finish(self, r: Request, out, nfe, fills, edits, finish, error=None) -> None:
    now = time.monotonic()
    self.stats[finish if finish in ("cancelled", "error") else "finished"] += 1
    result = RowResult(output_ids=out, nfe=nfe, fills=fills, edits=edits, finish=finish,
                       seconds=now - r.submitted,
                       queued_seconds=(r.admitted or now) - r.submitted, error=error)
    if r.on_done is not None:
      r.on_done(result)

