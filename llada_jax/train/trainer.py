"""The training loop: state, jitted steps, data, metrics, orbax checkpoints with exact resume.

Train state is a pytree `{"params", "opt_state", "step"}`; the PRNG key of step s is
`fold_in(PRNGKey(seed), s)`, and the data iterator state is checkpointed with the train state, so
a run resumed from any checkpoint continues bit-identically.

Scale-out (`llada_jax.train.sharding`): with `cfg.mesh` set the state is created directly in its
shardings on that mesh, every step runs under it with one MoE / attention implementation, the
batch is assembled from per-process pieces, checkpoints are saved and restored sharded, and only
process 0 writes metrics, TensorBoard, `config.json`, `run_info.json` and HF exports.

Mixed precision: `param_dtype` is the dtype of the master params and optimizer moments (float32
by default) and `dtype` the compute dtype; the step casts the params to `dtype` inside.
`param_dtype="bfloat16"` is pure-bf16 training (half the memory, updates below bf16 resolution
are lost), with a warning.

Preemption: SIGTERM (or a first Ctrl-C) finishes the current step, saves a checkpoint and ends the
run with `preempted = True` and `preempted_by` the signal's name (the CLI exits with status 75, or
130 for Ctrl-C); rerunning resumes. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
import optax

import llada_jax
from llada_jax.config import ModelConfig, get_preset
from llada_jax.errors import InputError, describe_value
from llada_jax.train import ebpo as ebpo_lib
from llada_jax.train import run_files, sharding, steps, toy_tasks, wsd
from llada_jax.train.objectives import ObjectiveConfig
from llada_jax.train.run_files import RunMismatch  # noqa: F401  (re-exported)

STAGES = ("bdlm", "dpo", "ebpo")
# DPO's frozen reference: its ELBOs computed at every step with the policy's noise ("online"),
# or once per pair before training with per-record noise ("precomputed": no reference params
# on the devices while training).
DPO_REFERENCES = ("online", "precomputed")
DTYPES = ("float32", "bfloat16")
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume


class ConfigError(InputError):
  """A bad training config: reported as one line before any work starts."""


class CheckpointWriteError(InputError):
  """A checkpoint could not be written (disk full, permissions): one line, exit status 2."""


def _is_write_error(e: BaseException) -> bool:
  """Whether `e` (or what it wraps) is the OS refusing a write: an `OSError`, or tensorstore's
  error carrying an `os_error_code` (orbax re-raises those as ValueErrors). Anything else is a
  bug and keeps its traceback."""
  seen, x = 0, e
  while x is not None and seen < 8:
    if isinstance(x, OSError) or "os_error_code" in str(x):
      return True
    x, seen = x.__cause__ or x.__context__, seen + 1
  return False


def _write_error_reason(e: BaseException) -> str:
  """'File too large', 'No space left on device', ...: the OS error behind a failed write."""
  for x in (e, e.__cause__, e.__context__):
    if isinstance(x, OSError) and x.strerror:
      return x.strerror
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  return " ".join(text.split())[:200]


# ---- configuration ------------------------------------------------------------------------------
def model_config(cfg) -> ModelConfig:
  """The model config with `param_dtype` (master params) and `dtype` (compute) of the run."""
  if cfg.init_from:
    return ModelConfig.from_json_file(cfg.init_from).replace(
        param_dtype=cfg.param_dtype, dtype=cfg.dtype)
  base = get_preset(cfg.model.preset)
  return base.replace(**dict(cfg.model.overrides), param_dtype=cfg.param_dtype, dtype=cfg.dtype)


def objective_config(cfg, block_length: int, step: int) -> ObjectiveConfig:
  kw = dict(cfg.objective)
  kw["block_length"] = block_length
  if step >= cfg.noise_steps:
    kw["mask_embed_noise"] = 0.0
  return ObjectiveConfig(**kw)


def block_stages(cfg) -> tuple:
  if cfg.wsd.enabled:
    return tuple((int(s), int(b)) for s, b in cfg.wsd.stages)
  return ((cfg.steps, cfg.objective.block_length),)


# (config key, smallest allowed value, integer?) for the numeric fields of a training config.
_NUMBERS = (
    ("steps", 1, True), ("seed", 0, True), ("log_every", 1, True), ("ckpt_every", 1, True),
    ("keep", 1, True), ("grad_accum_steps", 1, True), ("noise_steps", 0, True),
    ("data.seq_len", 1, True), ("data.batch_size", 1, True),
    ("objective.block_length", 1, True),
    ("optim.lr", 0.0, False), ("optim.warmup_steps", 0, True), ("optim.clip", 0.0, False),
    ("optim.weight_decay", 0.0, False), ("optim.decay_fraction", 0.0, False),
    ("optim.final_lr_fraction", 0.0, False), ("optim.b1", 0.0, False), ("optim.b2", 0.0, False),
    ("dpo.beta", 0.0, False), ("ebpo.group_size", 1, True), ("ebpo.gen_length", 1, True),
    ("ebpo.updates_per_rollout", 1, True), ("ebpo.num_timesteps", 1, True),
    ("eval_every", 0, True), ("eval_batches", 1, True), ("moe_bias_rate", 0.0, False),
)
# Fields that are fractions in [0, 1].
_FRACTIONS = ("optim.decay_fraction", "optim.final_lr_fraction", "optim.b1", "optim.b2",
              "objective.t_min", "objective.t_max", "objective.edit_rate",
              "objective.mtf_rate", "ebpo.threshold", "ebpo.editing_threshold")


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _check_numbers(cfg) -> None:
  """Types and ranges of the numeric fields (one line naming the field, value and range)."""
  for name, low, integer in _NUMBERS:
    v = _get(cfg, name)
    if v is None:
      continue
    ok_type = (isinstance(v, int) if integer else isinstance(v, (int, float)))
    if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
      kind = "an integer" if integer else "a finite number"
      raise ConfigError(f"{name}={describe_value(v)} must be {kind} >= {low}")
    if v < low:
      raise ConfigError(f"{name}={v} must be >= {low}")
  for name in _FRACTIONS:
    v = _get(cfg, name)
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
      hint = " (a fraction, not a percentage)" if isinstance(v, (int, float)) and 1 < v <= 100 else ""
      raise ConfigError(f"{name}={describe_value(v)} must be in [0, 1]{hint}")


def validate(cfg) -> None:
  """Checks everything that can be checked before loading data or compiling."""
  if cfg.stage not in STAGES:
    raise ConfigError(f"stage {cfg.stage!r} (choose from {', '.join(STAGES)})")
  _check_numbers(cfg)
  for name in ("param_dtype", "dtype"):
    if cfg[name] not in DTYPES:
      raise ConfigError(f"{name} {cfg[name]!r} (choose from {', '.join(DTYPES)})")
  seq_len = cfg.data.seq_len
  try:
    for _, block in block_stages(cfg):
      objective_config(cfg, block, 0).validate(seq_len)
    wsd.validate(block_stages(cfg), seq_len)
    model_config(cfg)
    from llada_jax.parallel.mesh import parse_mesh_spec  # noqa: PLC0415
    parse_mesh_spec(cfg.get("mesh") or None)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  if cfg.optim.schedule not in ("cosine", "wsd", "constant"):
    raise ConfigError(f"optim.schedule {cfg.optim.schedule!r} (cosine, wsd or constant)")
  accum = cfg.get("grad_accum_steps", 1)
  if accum < 1 or cfg.data.batch_size % accum:
    raise ConfigError(f"grad_accum_steps={accum} must be >= 1 and divide data.batch_size="
                      f"{cfg.data.batch_size}")
  if cfg.data.get("shards", 0) < 0:
    raise ConfigError("data.shards must be >= 0 (0: one shard per process)")
  if cfg.stage == "bdlm" and not (cfg.data.source or cfg.data.task):
    raise ConfigError("data.source (a corpus) or data.task (a toy task) is required")
  if cfg.data.source and not os.path.exists(cfg.data.source):
    raise ConfigError(f"data.source {cfg.data.source} does not exist")
  if cfg.stage == "dpo" and not (cfg.data.task or cfg.data.source):
    raise ConfigError("stage dpo needs data.source (preference pairs: JSONL or a tfds dataset "
                      f"with prompt, chosen, rejected) or data.task (one of {sorted(toy_tasks.TASKS)})")
  reference = cfg.get("dpo", {}).get("reference", "online")
  if reference not in DPO_REFERENCES:
    raise ConfigError(f"dpo.reference {reference!r} (choose from {', '.join(DPO_REFERENCES)})")
  if cfg.stage == "dpo" and reference == "precomputed":
    if cfg.data.task or not cfg.data.source:
      raise ConfigError("dpo.reference=precomputed needs data.source (a finite set of pairs "
                        "whose reference ELBOs are computed once) and no data.task; toy tasks "
                        "use online")
    if len({block for _, block in block_stages(cfg)}) > 1:
      raise ConfigError("dpo.reference=precomputed needs one block length for the whole run "
                        "(the reference ELBOs are computed at it); this run's WSD stages change "
                        "it")
  if cfg.stage == "ebpo":
    if not (cfg.data.task or cfg.data.source):
      raise ConfigError("stage ebpo needs data.source (a prompt set: JSONL or a tfds dataset "
                        f"with prompt and answer or tests) or data.task (one of {sorted(toy_tasks.TASKS)})")
    from llada_jax.train import rewards  # noqa: PLC0415
    try:
      rewards.get_reward(cfg.get("reward", "char_overlap"))
      ebpo_config(cfg, cfg.objective.block_length).validate()
    except ValueError as e:
      raise ConfigError(str(e)) from None
  from llada_jax.train.records import BAD_RECORDS  # noqa: PLC0415
  if cfg.data.get("bad_records", "error") not in BAD_RECORDS:
    raise ConfigError(f"data.bad_records {cfg.data.bad_records!r} (choose from "
                      f"{', '.join(BAD_RECORDS)})")
  if cfg.data.task:
    try:
      toy_tasks.get_task(cfg.data.task)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if cfg.get("eval_every", 0):
    if cfg.stage != "bdlm":
      raise ConfigError(f"eval_every: held-out evaluation is for the bdlm stage (this run is "
                        f"{cfg.stage}); set eval_every=0")
    if cfg.data.source and not cfg.data.get("validation_fraction", 0.0):
      raise ConfigError("eval_every needs held-out data: set data.validation_fraction (e.g. "
                        "0.05 of the documents, never trained on)")
  vf = cfg.data.get("validation_fraction", 0.0)
  if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
    raise ConfigError(f"data.validation_fraction={describe_value(vf)} must be in [0, 1)")
  if cfg.data.get("pack", False) and cfg.data.kind != "sft":
    raise ConfigError("data.pack=True packs SFT examples (data.kind=sft); pretraining rows are "
                      "always packed")
  if cfg.data.get("eos_padding", "none") not in ("none", "block"):
    raise ConfigError(f"data.eos_padding {cfg.data.eos_padding!r} (none or block)")


def ebpo_config(cfg, block: int, tp=None) -> ebpo_lib.EBPOConfig:
  """The EBPO objective's settings for decoding block `block` (`tp`: the parallel setup)."""
  e = cfg.ebpo
  impl = (dict(attention_impl=tp.attention_impl, moe_impl=tp.moe_impl, remat=tp.remat)
          if tp is not None else {})
  return ebpo_lib.EBPOConfig(
      group_size=e.group_size, num_timesteps=e.num_timesteps,
      weights=tuple(float(w) for w in e.get("timestep_weights", ())), eps_low=e.eps_low,
      eps_high=e.eps_high, ratio_level=e.get("ratio_level", "block"),
      noise=e.get("noise", ebpo_lib.EBPOConfig.noise), block_length=block,
      **impl)


# ---- optimizer --------------------------------------------------------------------------------
def learning_rate(cfg) -> optax.Schedule:
  o, total = cfg.optim, cfg.steps
  warm = min(o.warmup_steps, total)
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warm, 1)),
                                 optax.constant_schedule(o.lr)], [warm])
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, max(warm, 1), max(total, warm + 1),
                                              end_value=o.lr * o.final_lr_fraction)
  decay = max(int(total * o.decay_fraction), 1)  # warmup-stable-decay
  return optax.join_schedules([
      optax.linear_schedule(0.0, o.lr, max(warm, 1)),
      optax.constant_schedule(o.lr),
      optax.linear_schedule(o.lr, o.lr * o.final_lr_fraction, decay)],
      [warm, max(total - decay, warm)])


def make_optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optim
  return optax.chain(optax.clip_by_global_norm(o.clip),
                     optax.adamw(learning_rate(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


# ---- steps (single-device entry points, kept for tools/export_tpu.py and scripts) ---------------
@functools.partial(jax.jit, static_argnames=("c", "oc", "optimizer", "accum"),
                   donate_argnums=(0,))
def bdlm_step(state, batch, key, *, c, oc, optimizer, accum=1):
  """One BDLM step (`llada_jax.train.steps.bdlm_step`) jitted without explicit shardings."""
  return steps.bdlm_step(steps.StepSpec(c, oc=oc, accum=accum), optimizer, state, batch, key)


# ---- data -------------------------------------------------------------------------------------
class TaskSource:
  """Deterministic batches from a toy task: batch i depends only on (seed, i) (resumable)."""

  def __init__(self, task: str, tokenizer, seq_len: int, batch_size: int, seed: int,
               block_length: int, eos_padding: str = "none"):
    self.fn = toy_tasks.get_task(task)
    self.tok, self.seq_len, self.batch_size, self.seed = tokenizer, seq_len, batch_size, seed
    self.block_length = block_length
    self.eos_padding = eos_padding  # "none" | "block": EOS up to the end of the answer's block
    self.index = 0

  def _rows(self, examples, answer_of=lambda e: e[1]):
    from llada_jax.train.ebpo import build_batch
    prompts = [self.tok.encode(p) for p, _ in examples]
    answers = [self.tok.encode(answer_of(e)) + [self.tok.eos_id] for e in examples]
    if self.eos_padding == "block":  # the decoder fills a whole block: train what follows EOS
      answers = [ebpo_lib.eos_pad(p, a, self.block_length, self.tok.eos_id)
                 for p, a in zip(prompts, answers)]
    return build_batch(prompts, answers, self.seq_len, self.tok.pad_id)

  def _examples(self, i):
    rng = random.Random(self.seed * 1_000_003 + i)
    return [self.fn(rng) for _ in range(self.batch_size)]

  def __next__(self) -> dict:
    batch = self._rows(self._examples(self.index))
    self.index += 1
    return batch

  def next_pair(self) -> tuple[dict, dict]:
    """(chosen, rejected): the right answer vs the answer of another example."""
    ex = self._examples(self.index)
    self.index += 1
    wrong = [(p, ex[(k + 1) % len(ex)][1]) for k, (p, _) in enumerate(ex)]
    return self._rows(ex), self._rows(wrong)

  def prompts(self) -> tuple[list[list[int]], list[str]]:
    ex = self._examples(self.index)
    self.index += 1
    return [self.tok.encode(p) for p, _ in ex], [a for _, a in ex]

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def make_tokenizer(cfg, c: ModelConfig):
  """Byte-level ids (with the model's special ids) or a `tokenizer.json` directory."""
  from llada_jax.train import data as data_lib
  if cfg.tokenizer == "bytes":
    return data_lib.ByteTokenizer(eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                                  mask_id=c.mask_token_id, vocab_size=c.vocab_size)
  from llada_jax.tokenizer import Tokenizer
  return data_lib.TokenizerAdapter(Tokenizer.from_dir(cfg.tokenizer), eos_id=c.eos_token_id,
                                   pad_id=c.pad_token_id)


class ShardedSource:
  """This process's rows of the global batch from a grain corpus: one iterator per data shard
  it reads (`sharding.DataLayout`), their batches concatenated; the state is per shard."""

  def __init__(self, iterators: dict, path: str | None = None):
    self.iterators = iterators  # shard index -> DataIterator
    self.path = path  # the prepared dataset's directory

  def __next__(self) -> dict:
    parts = [next(it) for it in self.iterators.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    from llada_jax.train import data as data_lib  # noqa: PLC0415
    return {str(k): data_lib.iterator_state(it) for k, it in self.iterators.items()}

  def set_state(self, shards: dict) -> None:
    from llada_jax.train import data as data_lib  # noqa: PLC0415
    for k, it in self.iterators.items():
      if str(k) not in shards:
        raise ValueError(f"the checkpoint has no data state for shard {k} "
                         f"(it holds shards {sorted(shards)})")
      data_lib.restore_iterator(it, shards[str(k)])


def make_source(cfg, tokenizer, block_length: int, layout: sharding.DataLayout | None = None):
  """A `TaskSource` (toy task: every process draws the whole global batch) or a
  `ShardedSource` over the corpus (this process's data shards of `layout`)."""
  d = cfg.data
  if d.task:
    return TaskSource(d.task, tokenizer, d.seq_len, d.batch_size, cfg.seed, block_length,
                      eos_padding=d.get("eos_padding", "none"))
  bad = d.get("bad_records", "error")
  if cfg.stage == "dpo":  # preference pairs (JSONL); every process draws the global batch
    from llada_jax.train.preferences import PairSource  # noqa: PLC0415
    return PairSource(d.source, tokenizer, d.seq_len, d.batch_size, cfg.seed, bad_records=bad,
                      eos_block=block_length if d.get("eos_padding") == "block" else 0)
  if cfg.stage == "ebpo":  # a prompt set (JSONL); every process draws the global batch
    from llada_jax.train.prompt_sets import PromptSource  # noqa: PLC0415
    from llada_jax.train.rewards import REQUIRED_FIELDS  # noqa: PLC0415
    return PromptSource(d.source, tokenizer, d.seq_len, cfg.ebpo.gen_length, d.batch_size,
                        cfg.seed, needs=REQUIRED_FIELDS.get(cfg.reward, "answer"),
                        bad_records=bad)
  from llada_jax.train import data as data_lib
  layout = layout or sharding.DataLayout(d.batch_size, 1, (0,))
  path = data_lib.build_dataset(
      d.source, d.dataset_dir or os.path.join(cfg.workdir, "dataset"), name=d.name,
      validation_fraction=d.get("validation_fraction", 0.0)) if jax.process_index() == 0 else None
  path = _shared_dataset_path(cfg, path)
  return ShardedSource({k: data_lib.make_iterator(
      path, split="train", tokenizer=tokenizer, seq_len=d.seq_len,
      batch_size=layout.rows_per_shard, seed=cfg.seed, kind=d.kind, block_length=block_length,
      train_block_padding=d.get("block_padding", False), pack=d.get("pack", False),
      shard_index=k, shard_count=layout.num_shards) for k in layout.local_shards}, path=path)


EVAL_SEED_OFFSET = 7919  # toy tasks: held-out batches come from seed + this (never trained on)


def make_eval_source(cfg, tokenizer, block_length: int, train_source,
                     layout: sharding.DataLayout | None = None):
  """A fresh source of held-out batches (the same ones at every evaluation): the corpus's
  `validation` split (`data.validation_fraction` of the documents, never trained on), or a toy
  task drawn with another seed."""
  d = cfg.data
  if d.task:
    return TaskSource(d.task, tokenizer, d.seq_len, d.batch_size, cfg.seed + EVAL_SEED_OFFSET,
                      block_length, eos_padding=d.get("eos_padding", "none"))
  from llada_jax.train import data as data_lib  # noqa: PLC0415
  layout = layout or sharding.DataLayout(d.batch_size, 1, (0,))
  return ShardedSource({k: data_lib.make_iterator(
      train_source.path, split="validation", tokenizer=tokenizer, seq_len=d.seq_len,
      batch_size=layout.rows_per_shard, seed=cfg.seed, kind=d.kind, block_length=block_length,
      train_block_padding=d.get("block_padding", False), pack=d.get("pack", False),
      shard_index=k, shard_count=layout.num_shards, num_epochs=None)
      for k in layout.local_shards})


def _shared_dataset_path(cfg, path):
  """Process 0 builds the dataset; the others wait for it and use the same path."""
  if jax.process_count() == 1:
    return path
  from jax.experimental import multihost_utils  # noqa: PLC0415
  multihost_utils.sync_global_devices("llada_jax.train: dataset built")
  return sharding.allgather_json(path)[0]


def _global_source(source) -> bool:
  """Sources every process draws whole (toy tasks, preference pairs): their state is global."""
  from llada_jax.train.preferences import PairSource  # noqa: PLC0415
  from llada_jax.train.prompt_sets import PromptSource  # noqa: PLC0415
  return isinstance(source, (TaskSource, PairSource, PromptSource))


def source_state(source) -> dict:
  """The data state of the whole run (every process's shards), the same on every process."""
  if _global_source(source):
    return source.get_state()
  merged = {}
  for shards in sharding.allgather_json(source.get_state()):
    merged.update(shards)
  return {"grain_shards": merged}


def restore_source(source, state: dict) -> None:
  if _global_source(source):
    source.set_state(state)
  elif "grain" in state:  # a checkpoint from before data shards: one shard
    source.set_state({"0": state["grain"]})
  else:
    source.set_state(state["grain_shards"])


# ---- the loop ---------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
  pass


def _is_main() -> bool:
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  """Waits for every process (nothing to wait for on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(f"llada_jax.train: {name}")


def _warn(msg: str) -> None:
  if _is_main():
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Trainer:
  """Runs one training stage described by an ml_collections config in `workdir`.

  `force=True` resumes a run directory even when it was started with another config.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
               force: bool = False):
    cfg = ml_collections.ConfigDict(cfg)
    cfg.workdir = workdir
    validate(cfg)
    self.cfg, self.workdir, self.progress = cfg, workdir, progress
    self.c = model_config(cfg)
    self.stages = block_stages(cfg)
    self.accum = int(cfg.get("grad_accum_steps", 1))
    import orbax.checkpoint as ocp
    self.ocp = ocp
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.mode = run_files.check(workdir, run_files.record(cfg, self.c), force=force,
                                has_checkpoint=_has_checkpoint(ckpt_dir))
    try:
      self.tp = sharding.setup(cfg)
      self.layout = sharding.data_layout(self.tp, cfg.data.batch_size, cfg.data.seq_len,
                                         cfg.data.get("shards", 0))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _barrier("run directory checked")
    if _is_main():
      os.makedirs(workdir, exist_ok=True)
      if self.mode == "warm_start":
        _warn(f"config.init_from changed: starting over; the previous run is in "
              f"{run_files.supersede(workdir)}")
      elif self.mode == "forced":
        old = run_files.read(workdir)
        _warn("--force: resuming with another config ("
              + "; ".join(run_files.differences(old, run_files.record(cfg, self.c))) + ")")
      run_files.write_json(os.path.join(workdir, run_files.CONFIG_NAME),
                           run_files.record(cfg, self.c))
    _barrier("run directory written")
    if cfg.param_dtype == "bfloat16":
      _warn("param_dtype=bfloat16: pure-bf16 training (bf16 weights and optimizer moments); "
            "updates below bf16 resolution are lost. The default keeps float32 master weights "
            "with dtype=bfloat16 compute")
    self.optimizer = make_optimizer(cfg)
    self.tokenizer = make_tokenizer(cfg, self.c)
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.abstract_state, self.state_shardings = sharding.state_shardings(
        self.tp, self.c, self.optimizer)
    self.steps = steps.CompiledSteps(cfg.stage, self.optimizer, self.state_shardings,
                                     self.tp.mesh, rows_spec=self.tp.rows)
    self.manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True))
    self.preempted = False
    self.stepped = False  # whether this run has taken a training step
    self.preempted_by = ""
    self._term = False

  # -- state --
  def _initial_params(self):
    """The run's starting params (random or `init_from`), placed by the rules."""
    cfg, ps = self.cfg, self.state_shardings["params"]
    if cfg.init_from:
      load = llada_jax.load_hf_checkpoint
      if "mesh" in inspect.signature(load).parameters:  # streams each device's slices
        _, params = load(cfg.init_from, dtype=cfg.param_dtype, mesh=self.tp.mesh,
                         rules=self.tp.rules)
      else:
        _, params = load(cfg.init_from, dtype=cfg.param_dtype)
      return llada_jax.parallel.put(params, ps)
    with jax.set_mesh(self.tp.mesh):
      init = jax.jit(lambda k: llada_jax.init_params(self.c, k), out_shardings=ps)
      return init(jax.random.PRNGKey(cfg.seed))

  def _initial_state(self):
    """A fresh train state, created in its shardings."""
    if not self.cfg.init_from:
      return sharding.init_state(self.tp, self.c, self.optimizer, self.cfg.seed,
                                 self.state_shardings)
    return sharding.state_from_params(self.tp, self._initial_params(), self.optimizer,
                                      self.state_shardings)

  def _reference_params(self, params=None):
    """DPO's frozen reference: the starting params (`params`, or made again when resuming) in
    the compute dtype."""
    ps = self.state_shardings["params"]
    cast = jax.jit(lambda p: steps.compute_params(p, self.c), out_shardings=ps)
    with jax.set_mesh(self.tp.mesh):
      return cast(self._initial_params() if params is None else params)

  def _save(self, step: int, state, source) -> None:
    ocp = self.ocp
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(source_state(source))))
    except Exception as e:  # noqa: BLE001 (orbax raises ValueErrors from its writer threads)
      if not _is_write_error(e):
        raise
      raise self._write_failed(e) from e

  def _finish_writes(self) -> None:
    """Waits for the background checkpoint writes; a failed one is a `CheckpointWriteError`."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if not _is_write_error(e):
        raise
      raise self._write_failed(e) from e

  def _write_failed(self, e: BaseException) -> "CheckpointWriteError":
    """The one-line report of a checkpoint that could not be written (disk full, read-only or
    missing directory): the unfinished temporary directories are removed, the complete
    checkpoints stay as they are."""
    ckpt_dir = os.path.join(self.workdir, "checkpoints")
    if _is_main() and os.path.isdir(ckpt_dir):
      for name in os.listdir(ckpt_dir):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    steps_done = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) \
        if os.path.isdir(ckpt_dir) else []
    kept = (f"the last complete checkpoint, step {steps_done[-1]}, is intact" if steps_done
            else "there is no complete checkpoint yet")
    return CheckpointWriteError(
        f"cannot write a checkpoint in {ckpt_dir} ({_write_error_reason(e)}): training stopped; "
        f"{kept} (free space or fix the directory, then rerun to resume)")

  def _restore(self, source):
    """(state, step) of the latest checkpoint, restored into the run's shardings, or
    (None, 0) without one."""
    step = self.manager.latest_step()
    if step is None:
      return None, 0
    ocp = self.ocp
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self.abstract_state), data=ocp.args.JsonRestore()))
    try:
      restore_source(source, out["data"])
    except ValueError as e:
      raise ConfigError(f"cannot resume the data pipeline of step {step}: {e} (resume with "
                        "the data settings and data.shards it was saved with)") from None
    if _is_main():
      self._truncate_metrics(step)
    return out["state"], step

  def _truncate_metrics(self, step: int) -> None:
    if not os.path.exists(self.metrics_path):
      return
    with open(self.metrics_path) as f:
      keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.metrics_path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.metrics_path)

  def _write_run_info(self, state) -> None:
    info = sharding.mesh_description(self.tp)
    info.update(
        params_bytes=sharding.device_bytes(state["params"]),
        opt_state_bytes=sharding.device_bytes(state["opt_state"]),
        param_dtype=self.c.param_dtype, compute_dtype=self.c.dtype,
        global_batch=self.cfg.data.batch_size, grad_accum_steps=self.accum,
        data_shards=self.layout.num_shards, rows_per_shard=self.layout.rows_per_shard)
    if _is_main():
      run_files.write_json(os.path.join(self.workdir, run_files.RUN_INFO_NAME), info)
    self.run_info = info

  # -- logging --
  def _log(self, step: int, metrics: dict, writer) -> None:
    """One metrics.jsonl row: scalars as numbers, per-layer arrays (MoE load) as lists; the
    scalars, and the worst layer of each per-layer statistic, go to TensorBoard."""
    row = {"step": step}
    for k, v in metrics.items():
      if k == "finite":
        continue
      v = np.asarray(v)
      row[k] = float(v) if v.ndim == 0 else np.round(v, 4).tolist()
    if not _is_main():
      return
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if writer is not None:
      for k, v in row.items():
        if k == "step" or k == "expert_tokens":
          continue
        if isinstance(v, list):
          k, v = f"{k}_worst", (max(v) if k.endswith("max") else min(v)) if v else 0.0
        writer.add_scalar(k, v, step)

  def _open_writer(self):
    if not _is_main():
      return None
    try:
      from tensorboardX import SummaryWriter
      return SummaryWriter(os.path.join(self.workdir, "tensorboard"))
    except ImportError:  # pragma: no cover
      return None

  # -- preemption --
  def _on_signal(self, signum, frame) -> None:
    if signum == signal.SIGINT and self._term:  # a second Ctrl-C: end the process now (the
      from llada_jax.errors import _exit_interrupted  # noqa: PLC0415  complete checkpoints
      _exit_interrupted()  # stay whole: orbax writes into temporary directories)
    self._term = True
    self.preempted_by = signal.Signals(signum).name

  def _install_handlers(self) -> dict:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) finish the step and save; returns the handlers
    to restore (none off the main thread)."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        previous[sig] = signal.signal(sig, self._on_signal)
      except ValueError:  # not the main thread: no handler
        pass
    return previous

  # -- main --
  def run(self) -> dict:
    """Trains to `cfg.steps` (resuming from the latest checkpoint); returns the last logged
    metrics. After a SIGTERM it stops early with `self.preempted` set (checkpoint saved)."""
    previous = self._install_handlers()
    try:
      return self._run()
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  def _run(self) -> dict:
    cfg = self.cfg
    block0 = wsd.block_length_at(self.stages, 0)
    source = make_source(cfg, self.tokenizer, block0, self.layout)
    self._train_source = source
    state, start = self._restore(source)
    fresh = state is None
    if fresh:
      state = self._initial_state()
    ref_params = None
    if cfg.stage == "dpo":
      ref_params = self._reference_params(state["params"] if fresh else None)
      if self._precomputed_reference:
        source.attach_reference(self._precompute_reference(source, ref_params, block0))
        ref_params = None  # the table replaces them: no second copy of the model while training
    self._write_run_info(state)
    if jax.process_count() > 1:
      from llada_jax.parallel import distributed  # noqa: PLC0415
      print(f"{distributed.describe()}; mesh {self.run_info['mesh']}; data shards "
            f"{list(self.layout.local_shards)} of {self.layout.num_shards}", flush=True)
    base_key = jax.random.PRNGKey(cfg.seed)
    lr = learning_rate(cfg)
    writer = self._open_writer()
    bar = None
    if self.progress and _is_main():
      from tqdm import tqdm
      bar = tqdm(total=cfg.steps, initial=start, desc=f"train[{cfg.stage}]", unit="step")
    last = {}
    t_last, tokens = time.perf_counter(), 0.0
    try:
      for step in range(start, cfg.steps):
        if step == cfg.debug_kill_at_step:
          self.manager.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
        if step == cfg.get("debug_term_at_step", -1):
          os.kill(os.getpid(), signal.SIGTERM)
        key = jax.random.fold_in(base_key, step)
        block = wsd.block_length_at(self.stages, step)
        state, metrics = self._step(state, source, key, block, step, ref_params)
        self.stepped = True
        tokens += float(metrics.pop("tokens"))
        if not bool(metrics["finite"]):
          raise NonFiniteLoss(
              f"non-finite loss at step {step}; stopped, the last good checkpoint is step "
              f"{self.manager.latest_step()}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
          now = time.perf_counter()
          metrics = dict(metrics, lr=lr(step), block_length=block,
                         tokens_per_s=tokens / max(now - t_last, 1e-9))
          t_last, tokens = now, 0.0
          self._log(done, metrics, writer)
          last = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
          if "expert_load_max" in metrics:  # the busiest expert of any layer, over the mean
            last["expert_load_max"] = float(np.max(metrics["expert_load_max"]))
          if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}", block=block)
        every = cfg.get("eval_every", 0)
        if every and (done % every == 0 or done == cfg.steps):
          held_out = self._evaluate(state["params"], block, step)
          self._log(done, held_out, writer)
          last.update(held_out)
        saved = done % cfg.ckpt_every == 0 or done == cfg.steps
        if saved:
          self._save(done, state, source)
        if bar is not None:
          bar.update(1)
        if done < cfg.steps and sharding.any_process(self._term):
          if not saved:
            self._save(done, state, source)
          self.preempted, self.preempted_at = True, done
          break
    except BaseException:  # already failing: finish what can be, report the first error
      try:
        self.manager.wait_until_finished()
      except Exception:  # noqa: BLE001
        pass
      raise
    else:
      self._finish_writes()
    finally:
      if bar is not None:
        bar.close()
      if writer is not None:
        writer.close()
    self.state = state
    if cfg.export_hf and not self.preempted:
      self._export(state["params"])
    return last

  def _export(self, params) -> None:
    """HF checkpoint of the params in the compute dtype (gathered; written by process 0)."""
    host = llada_jax.parallel.to_host(params)
    if _is_main():
      llada_jax.save_hf_checkpoint(self.cfg.export_hf, self.c, host, dtype=self.c.dtype)
      if self.cfg.tokenizer != "bytes":  # the run's tokenizer files, next to the weights
        from llada_jax.tokenizer import copy_tokenizer  # noqa: PLC0415
        copy_tokenizer(self.cfg.tokenizer, self.cfg.export_hf)

  def _objective(self, block: int, step: int) -> ObjectiveConfig:
    return dataclasses.replace(objective_config(self.cfg, block, step),
                               moe_impl=self.tp.moe_impl, attention_impl=self.tp.attention_impl,
                               remat=self.tp.remat)

  def _evaluate(self, params, block: int, step: int) -> dict:
    """Held-out metrics (`eval_loss`, `eval_accuracy`, ...: the step's objective, no update)
    averaged over the first `eval_batches` held-out batches, the same batches and noise at every
    evaluation (so the curve is comparable across steps)."""
    cfg = self.cfg
    source = make_eval_source(cfg, self.tokenizer, block, self._train_source, self.layout)
    spec = steps.StepSpec(self.c, oc=self._objective(block, step), accum=self.accum)
    key = jax.random.PRNGKey(cfg.seed + EVAL_SEED_OFFSET)
    total: dict = {}
    n = cfg.get("eval_batches", 2)
    for i in range(n):
      m = self.steps.evaluate(spec, params, self._batch(source), jax.random.fold_in(key, i))
      for k, v in m.items():
        if np.ndim(v) == 0:
          total[k] = total.get(k, 0.0) + float(v) / n
    return {f"eval_{k}": v for k, v in total.items()}

  def _batch(self, source) -> dict:
    """The next global batch: toy tasks are drawn whole on every process, corpora per shard."""
    if isinstance(source, TaskSource):
      return sharding.put_rows(self.tp, next(source))
    return sharding.global_batch(self.tp, next(source), self.cfg.data.batch_size)

  @property
  def _precomputed_reference(self) -> bool:
    return self.cfg.get("dpo", {}).get("reference", "online") == "precomputed"

  @property
  def _record_key(self):
    """The key of the per-record DPO noise (`dpo.record_noise`), fixed for the run."""
    return jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 0x7FFFFFFF)

  def _precompute_reference(self, source, ref_params, block: int) -> np.ndarray:
    """The frozen reference's ELBOs `[pairs, 2]` (chosen, rejected) of every pair, in one pass
    in batches of a training micro-batch (data.batch_size / grad_accum_steps rows: what fits
    the devices), with each record's own noise (on the run's mesh)."""
    from llada_jax.train import dpo as dpo_lib  # noqa: PLC0415
    oc, key = self._objective(block, 0), self._record_key
    b = self.cfg.data.batch_size // self.accum
    fn = jax.jit(lambda rp, ch, rj: dpo_lib.reference_elbos(
        rp, self.c, ch, rj, dpo_lib.record_noise(key, ch, rj, oc), oc))
    table = np.zeros((source.size, 2), np.float32)
    t0, lo = time.perf_counter(), 0
    if _is_main():
      print(f"dpo: computing the reference's ELBOs of {source.size} pairs (one pass, batches "
            f"of {b})", flush=True)
    with jax.set_mesh(self.tp.mesh):
      for (chosen, rejected), n in source.ordered_pairs(b):
        batch = sharding.put_rows(self.tp, dict(chosen=chosen, rejected=rejected))
        out = llada_jax.parallel.to_host(fn(ref_params, batch["chosen"], batch["rejected"]))
        table[lo:lo + n] = np.stack([out["chosen"][:n], out["rejected"][:n]], -1)
        lo += n
    if _is_main():
      print(f"dpo: reference ELBOs done in {time.perf_counter() - t0:.1f} s", flush=True)
    return table

  def _step(self, state, source, key, block: int, step: int, ref_params):
    cfg = self.cfg
    oc = self._objective(block, step)
    if cfg.stage == "bdlm":
      spec = steps.StepSpec(self.c, oc=oc, accum=self.accum,
                            bias_rate=float(cfg.get("moe_bias_rate", 0.0)))
      return self.steps(spec, state, self._batch(source), key)
    if cfg.stage == "dpo":
      chosen, rejected = source.next_pair()
      batch = sharding.put_rows(self.tp, dict(chosen=chosen, rejected=rejected))
      spec = steps.StepSpec(self.c, oc=oc, beta=float(cfg.dpo.beta), accum=self.accum)
      if self._precomputed_reference:  # the noise each record's reference ELBO was made with
        key = self._record_key
      return self.steps(spec, state, batch, key, ref_params)
    return self._ebpo_step(state, source, key, block, step)

  def _ebpo_step(self, state, source, key, block: int, step: int):
    cfg, e, tp = self.cfg, self.cfg.ebpo, self.tp
    ecfg = ebpo_config(cfg, block, tp)
    prompts, records = source.prompts()
    if isinstance(source, TaskSource):  # toy tasks: the answer strings
      records = [{"answer": a} for a in records]
    reward = self._reward_fn()

    def gen(flat):
      return llada_jax.parallel.sharded_generate(
          state["params"], self.c, flat, tp.mesh, rules=tp.rules, moe_impl=tp.moe_impl,
          attention_impl=tp.attention_impl, mode=e.mode, gen_length=e.gen_length,
          block_length=block, temperature=e.temperature, seed=step,
          eos_id=self.tokenizer.eos_id, mask_id=self.c.mask_token_id,
          editing_threshold=e.editing_threshold, threshold=e.threshold,
          max_post_steps=e.max_post_steps)

    def score(row, response):
      return reward(self.tokenizer.decode(response), records[row // e.group_size])

    flat, responses, rewards = ebpo_lib.rollout(gen, prompts, e.group_size, score)
    adv = ebpo_lib.group_advantages(rewards).reshape(-1)
    scored = responses
    if cfg.data.get("eos_padding", "none") == "block":  # the decoded block after the EOS too
      scored = [ebpo_lib.eos_pad(p, r, block, self.tokenizer.eos_id)
                for p, r in zip(flat, responses)]
    batch = ebpo_lib.build_batch(flat, scored, cfg.data.seq_len, self.tokenizer.pad_id)
    batch = sharding.put_rows(tp, batch)
    masks, old = self._old_logprobs(ecfg, batch)(state["params"], batch, key)
    inputs = dict(batch=batch, masks=masks, old=old, adv=sharding.put_rows(tp, adv))
    spec = steps.StepSpec(self.c, ecfg=ecfg, accum=self.accum)
    per_update = []
    for _ in range(e.updates_per_rollout):
      state, metrics = self.steps(spec, state, inputs, key)
      per_update.append(metrics)
    # the first update's ratios are 1 by construction: the later ones show how far it moved
    last = {k: v for k, v in per_update[-1].items()
            if k in ("ratio", "ratio_std", "clip_fraction", "live")}
    metrics = dict(per_update[0], **{f"{k}_last": v for k, v in last.items()},
                   finite=all(bool(m["finite"]) for m in per_update),
                   reward=float(rewards.mean()), reward_std=float(rewards.std()),
                   reward_group_std=float(rewards.std(1).mean()),
                   response_length=float(np.mean([len(r) for r in responses])))
    if getattr(source, "skipped", 0):
      metrics["data_skipped"] = float(source.skipped)
    return state, metrics

  def _reward_fn(self):
    from llada_jax.train import rewards  # noqa: PLC0415
    return rewards.get_reward(self.cfg.get("reward", "char_overlap"))

  def _old_logprobs(self, ecfg, batch):
    """The jitted rollout-policy log-probs for `ecfg`, outputs split by rows."""
    cache = self.__dict__.setdefault("_old_cache", {})
    if ecfg not in cache:
      b, length = batch["tokens"].shape
      nb = length // ecfg.block_length if ecfg.block_length < length else 1
      n = ecfg.num_timesteps
      out = (self.tp.rows((b, n, length)), self.tp.rows((b, n, nb)))
      fn = jax.jit(functools.partial(steps.ebpo_old_logprobs, c=self.c, ecfg=ecfg),
                   out_shardings=out)

      def run(params, batch, key):
        with jax.set_mesh(self.tp.mesh):
          return fn(params, batch, key)
      cache[ecfg] = run
    return cache[ecfg]


def _has_checkpoint(ckpt_dir: str) -> bool:
  """Whether `ckpt_dir` holds a finished orbax step directory."""
  if not os.path.isdir(ckpt_dir):
    return False
  return any(name.isdigit() for name in os.listdir(ckpt_dir))
