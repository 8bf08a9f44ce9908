"""`generate`: ragged prompts in, per-row outputs and statistics out (host side of decoding)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import parallel
from llada_jax.config import ModelConfig
from llada_jax.decode.generate import STREAM_HANDLERS, Knobs, StaticSpec, decode_jit
from llada_jax.decode.settings import DecodeSettings
from llada_jax.decode.update import get_sampler
from llada_jax.model.transformer import get_attention, resolve_attention
from llada_jax.parallel.memory import Workload


@dataclasses.dataclass
class GenerateResult:
  """Per-row results. `output_ids` are the generated tokens up to and including the first EOS."""

  output_ids: list[list[int]]
  nfe: list[int]  # counted model forwards (those whose logits updated the canvas)
  tpf: list[float]  # tokens per forward: len(output_ids) / nfe
  fills: list[int]  # Mask-to-Token fills
  edits: list[int]  # Token-to-Token edits
  commits: int  # uncounted cache-commit forwards (batch-wide)
  settings: DecodeSettings
  trajectory: list[list[dict]] | None = None  # per row, per forward: start, tokens, fill, edit
  # Per row, why decoding stopped: "eos" (output ends at an EOS), "length" (gen_length tokens,
  # no EOS), or "budget": the iteration budget (`DecodeSettings.max_iterations`) ran out, or
  # (LLaDA2.0) a block's `steps` ran out, with mask ids left in the output. That happens only
  # when the model samples its own mask id (allowed, as in the reference: a filled mask stays a
  # mask and the loop goes on); `generate` warns when any row ends so.
  finish: list[str] = dataclasses.field(default_factory=list)

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["settings"] = dataclasses.asdict(self.settings)
    return d


class BudgetWarning(UserWarning):
  """Some rows ended with finish status "budget" (mask ids left in their output)."""


def finish_status(output_ids: list[int], done: bool, s: DecodeSettings) -> str:
  """"budget" when the row did not finish or holds a mask id, else "eos" or "length"."""
  if not done or s.mask_id in output_ids:
    return "budget"
  return "eos" if output_ids and output_ids[-1] == s.eos_id else "length"


def prompt_bucket(max_prompt: int, block_length: int) -> int:
  """Slots a prompt is padded to (one compilation per bucket): 1 to 4 blocks exactly, then a
  number of blocks 4 * 2^j or 6 * 2^j: two buckets per doubling, at most a third of a bucket
  padding (a power of two padded up to half: a 768-token prompt ran as 1024)."""
  blocks = max(1, -(-max_prompt // block_length))
  if blocks <= 4:
    return block_length * blocks
  shift = blocks.bit_length() - 3  # 4 <= blocks >> shift < 8
  m = -(-blocks // (1 << shift))
  return block_length * ((4 if m <= 4 else 6 if m <= 6 else 8) << shift)


def _check_prompts(prompts, config: ModelConfig, s: DecodeSettings) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  out = []
  for i, p in enumerate(prompts):
    p = [int(x) for x in np.asarray(p).reshape(-1)] if not isinstance(p, list) else p
    if not p:
      raise ValueError(f"prompt {i} is empty")
    if min(p) < 0 or max(p) >= config.vocab_size:
      raise ValueError(f"prompt {i} has a token id outside [0, {config.vocab_size})")
    need = len(p) + s.gen_length
    if need > config.max_position_embeddings:
      raise ValueError(f"prompt {i} ({len(p)} tokens) plus gen_length {s.gen_length} exceeds "
                       f"the model context of {config.max_position_embeddings} tokens")
    out.append([int(x) for x in p])
  return out


def _row_shardings(inputs, mesh, rules):
  """Canvas `[B, T]`, prompt lengths `[B]` and keys `[B, 2]`: rows over the batch axes."""
  return tuple(parallel.activation_sharding("rows", x.shape[:1], mesh, rules) for x in inputs)


def generate(params, config: ModelConfig, prompts, *, mode: str = "quality",
             trajectory: bool = False, attention_impl: str = "auto", moe_impl: str = "auto",
             update_impl: str = "jnp", sampler_impl: str = "logits", use_cache: bool = True,
             batch_invariant: bool = False, on_block=None, mesh=None, rules=None,
             **overrides) -> GenerateResult:
  """Decodes a batch of ragged prompts with block diffusion (see `DecodeSettings` for knobs).

  `prompts` is a list of token-id lists. Row i samples with key fold_in(PRNGKey(seed), i).
  `batch_invariant=True` runs rows one at a time inside the compiled loop, so a row's result is
  bitwise independent of the batch it shares (XLA's numerics depend on shapes otherwise).
  `on_block(rows, block, canvas, prompt_len)` (numpy arrays) is called from the compiled loop
  each time rows finish a block (streaming; compiled separately from the silent program).
  `use_cache=False` recomputes the whole canvas every step (the reference's way; a baseline).
  Repeated calls with the same (batch, prompt bucket, gen_length, block_length, algorithm,
  mbe_window, greedy) reuse the compiled program; thresholds and budgets are traced.
  `mesh` (None, "auto", a spec such as "data=2,expert=4", or a `Mesh`) decodes under that mesh:
  params placed by the logical-axis `rules` (a no-op when already placed, e.g. by
  `load_hf_checkpoint(..., mesh=)`), rows split over the batch axes, and with `moe_impl="auto"`
  the experts run expert-parallel and dropless (`llada_jax.parallel.resolve_moe_impl`).
  `sampler_impl`: "logits" (the window's [B, W, V] logits, then the sampler), "fused" (the LM
  head applied over vocabulary tiles inside the sampler, no full logits; same tokens, any mesh),
  "pallas" / "pallas_tpu" (greedy with the Pallas kernel; one device only).
  """
  s = DecodeSettings.for_mode(mode, **overrides).with_ids(config.eos_token_id,
                                                          config.mask_token_id)
  s.validate(config.vocab_size)
  attention_impl = resolve_attention(attention_impl)
  get_attention(attention_impl)  # one line on an unknown name, before any work
  get_sampler(sampler_impl)
  rows = _check_prompts(prompts, config, s)
  bl = s.block_length
  bucket = prompt_bucket(max(map(len, rows)), bl)
  canvas_len = bucket + -(-s.gen_length // bl) * bl
  canvas = np.full((len(rows), canvas_len), s.mask_id, np.int32)
  for i, p in enumerate(rows):
    canvas[i, :len(p)] = p
  prompt_len = np.array([len(p) for p in rows], np.int32)
  record = 0
  if trajectory:
    record = (canvas_len // bl) * (bl * s.mbe_window + s.max_post_steps + 1)
  spec = StaticSpec(canvas_length=canvas_len, prompt_bucket=bucket, gen_length=s.gen_length,
                    block_length=bl, algorithm=s.algorithm, mbe_window=s.mbe_window,
                    greedy=s.temperature == 0, trajectory=record,
                    attention_impl=attention_impl, moe_impl=moe_impl, update_impl=update_impl,
                    sampler_impl=sampler_impl, use_cache=use_cache, batch_invariant=batch_invariant,
                    stream=on_block is not None)
  base = jax.random.PRNGKey(s.seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(len(rows)))
  workload = Workload(batch=len(rows), prompt=bucket, gen=s.gen_length, block_length=bl)
  mesh = parallel.resolve_mesh(mesh, config, workload=workload, rules=rules)
  if mesh is not None and mesh.size > 1 and sampler_impl.startswith("pallas"):
    raise ValueError(f"sampler_impl {sampler_impl!r} runs on one device; under a mesh of "
                     f"{mesh.size} devices use 'fused' (the same tokens, sharded by XLA)")
  spec = dataclasses.replace(spec, moe_impl=parallel.resolve_moe_impl(moe_impl, mesh, rules,
                                                                     dropless=True))
  inputs = (jnp.asarray(canvas), jnp.asarray(prompt_len), keys)
  if on_block is not None:
    STREAM_HANDLERS.append(on_block)
  try:
    with parallel.mesh_context(mesh):
      if mesh is not None:
        params = parallel.shard_params(params, config, mesh, rules)
        inputs = parallel.put(inputs, _row_shardings(inputs, mesh, rules))
      out = decode_jit(params, config, *inputs, Knobs.from_settings(s), spec)
      out = parallel.to_host(out)  # whole on every process, also on a multi-host mesh
      if on_block is not None:
        jax.effects_barrier()
  finally:
    if on_block is not None:
      STREAM_HANDLERS.remove(on_block)
  ids, tpf, finish = [], [], []
  for i in range(len(rows)):
    toks = [int(x) for x in out["tokens"][i]]
    if s.eos_id in toks:
      toks = toks[: toks.index(s.eos_id) + 1]
    ids.append(toks)
    tpf.append(len(toks) / max(int(out["nfe"][i]), 1))
    finish.append(finish_status(toks, bool(out["done"][i]), s))
  budget = [i for i, f in enumerate(finish) if f == "budget"]
  if budget:
    warnings.warn(f"decoding stopped unfinished (finish 'budget') for row(s) {budget}: mask id "
                  f"{s.mask_id} left in the output; the model samples its own mask token "
                  f"(raise max_iterations, or steps for llada2.0)", BudgetWarning, stacklevel=2)
  traj = None
  if trajectory:
    traj = []
    for i in range(len(rows)):
      steps = []
      for k in range(min(record, int(out["nfe"][i]))):
        steps.append(dict(start=int(out["traj_start"][k, i]),
                          tokens=out["traj_tokens"][k, i].tolist(),
                          fill=out["traj_fill"][k, i].tolist(),
                          edit=out["traj_edit"][k, i].tolist()))
      traj.append(steps)
  return GenerateResult(output_ids=ids, nfe=[int(x) for x in out["nfe"]], tpf=tpf,
                        fills=[int(x) for x in out["fills"]],
                        edits=[int(x) for x in out["edits"]], commits=int(out["commits"]),
                        settings=s, trajectory=traj, finish=finish)
