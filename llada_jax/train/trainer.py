"""The training loop: state, jitted steps, data, metrics, orbax checkpoints with exact resume.

Train state is a pytree `{"params", "opt_state", "step"}`; the PRNG key of step s is
`fold_in(PRNGKey(seed), s)`, and the data iterator state is checkpointed with the train state, so
a run resumed from any checkpoint continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import llada_jax
from llada_jax.config import ModelConfig, get_preset
from llada_jax.train import dpo as dpo_lib
from llada_jax.train import ebpo as ebpo_lib
from llada_jax.train import toy_tasks, wsd
from llada_jax.train.objectives import ObjectiveConfig, bdlm_loss

STAGES = ("bdlm", "dpo", "ebpo")


class ConfigError(ValueError):
  """A bad training config: reported as one line before any work starts."""


# ---- configuration ------------------------------------------------------------------------------
def model_config(cfg) -> ModelConfig:
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


def validate(cfg) -> None:
  """Checks everything that can be checked before loading data or compiling."""
  if cfg.stage not in STAGES:
    raise ConfigError(f"stage {cfg.stage!r} (choose from {', '.join(STAGES)})")
  if cfg.steps < 1:
    raise ConfigError("steps must be >= 1")
  seq_len = cfg.data.seq_len
  try:
    for _, block in block_stages(cfg):
      objective_config(cfg, block, 0).validate(seq_len)
    wsd.validate(block_stages(cfg), seq_len)
    model_config(cfg)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  if cfg.optim.schedule not in ("cosine", "wsd", "constant"):
    raise ConfigError(f"optim.schedule {cfg.optim.schedule!r} (cosine, wsd or constant)")
  if cfg.stage == "bdlm" and not (cfg.data.source or cfg.data.task):
    raise ConfigError("data.source (a corpus) or data.task (a toy task) is required")
  if cfg.data.source and not os.path.exists(cfg.data.source):
    raise ConfigError(f"data.source {cfg.data.source} does not exist")
  if cfg.stage in ("dpo", "ebpo") and not cfg.data.task:
    raise ConfigError(f"stage {cfg.stage} needs data.task (one of {sorted(toy_tasks.TASKS)})")
  if cfg.data.task:
    try:
      toy_tasks.get_task(cfg.data.task)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if cfg.data.get("eos_padding", "none") not in ("none", "block"):
    raise ConfigError(f"data.eos_padding {cfg.data.eos_padding!r} (none or block)")


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


# ---- steps ------------------------------------------------------------------------------------
def _apply(optimizer, state, loss, grads, metrics):
  """One optimizer update; a non-finite loss leaves the state untouched (and is reported)."""
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  new = dict(params=keep(params, state["params"]), opt_state=keep(opt_state, state["opt_state"]),
             step=state["step"] + 1)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads), finite=ok)
  return new, metrics


@functools.partial(jax.jit, static_argnames=("c", "oc", "optimizer"), donate_argnums=(0,))
def bdlm_step(state, batch, key, *, c, oc, optimizer):
  grad_fn = jax.value_and_grad(bdlm_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state["params"], c, batch, key, oc)
  return _apply(optimizer, state, loss, grads, metrics)


@functools.partial(jax.jit, static_argnames=("c", "oc", "optimizer", "beta"),
                   donate_argnums=(0,))
def dpo_step(state, ref_params, chosen, rejected, key, *, c, oc, optimizer, beta):
  grad_fn = jax.value_and_grad(dpo_lib.dpo_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state["params"], ref_params, c, chosen, rejected, key, oc,
                                   beta)
  return _apply(optimizer, state, loss, grads, metrics)


@functools.partial(jax.jit, static_argnames=("c", "ecfg", "optimizer"), donate_argnums=(0,))
def ebpo_step(state, batch, masks_n, old_logp, advantages, *, c, ecfg, optimizer):
  grad_fn = jax.value_and_grad(ebpo_lib.ebpo_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state["params"], c, batch, masks_n, old_logp, advantages,
                                   ecfg)
  return _apply(optimizer, state, loss, grads, metrics)


@functools.partial(jax.jit, static_argnames=("c", "block_length", "n"))
def ebpo_old_logprobs(params, batch, key, *, c, block_length, n):
  trainable = batch["loss_mask"] & (batch["segment_ids"] >= 0)
  _, masks_n = ebpo_lib.timestep_masks(key, trainable, n)
  return masks_n, ebpo_lib.policy_block_logprobs(params, c, batch, masks_n, block_length)


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
      answers = [a + [self.tok.eos_id] * (-(len(p) + len(a)) % self.block_length)
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


def make_source(cfg, tokenizer, block_length: int):
  d = cfg.data
  if d.task:
    return TaskSource(d.task, tokenizer, d.seq_len, d.batch_size, cfg.seed, block_length,
                      eos_padding=d.get("eos_padding", "none"))
  from llada_jax.train import data as data_lib
  path = data_lib.build_dataset(d.source, d.dataset_dir or os.path.join(cfg.workdir, "dataset"),
                                name=d.name)
  return data_lib.make_iterator(path, split="train", tokenizer=tokenizer, seq_len=d.seq_len,
                                batch_size=d.batch_size, seed=cfg.seed, kind=d.kind,
                                block_length=block_length)


def source_state(source) -> dict:
  if isinstance(source, TaskSource):
    return source.get_state()
  from llada_jax.train import data as data_lib
  return {"grain": data_lib.iterator_state(source)}


def restore_source(source, state: dict) -> None:
  if isinstance(source, TaskSource):
    source.set_state(state)
  else:
    from llada_jax.train import data as data_lib
    data_lib.restore_iterator(source, state["grain"])


# ---- the loop ---------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
  pass


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class Trainer:
  """Runs one training stage described by an ml_collections config in `workdir`."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True):
    cfg = ml_collections.ConfigDict(cfg)
    cfg.workdir = workdir
    validate(cfg)
    self.cfg, self.workdir, self.progress = cfg, workdir, progress
    os.makedirs(workdir, exist_ok=True)
    self.c = model_config(cfg)
    self.stages = block_stages(cfg)
    self.optimizer = make_optimizer(cfg)
    self.tokenizer = make_tokenizer(cfg, self.c)
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True))

  # -- state --
  def _initial_params(self):
    if self.cfg.init_from:
      _, params = llada_jax.load_hf_checkpoint(self.cfg.init_from, dtype=self.cfg.param_dtype)
      return params
    return llada_jax.init_params(self.c, jax.random.PRNGKey(self.cfg.seed))

  def _initial_state(self, params):
    return dict(params=params, opt_state=self.optimizer.init(params),
                step=jnp.zeros((), jnp.int32))

  def _save(self, step: int, state, source) -> None:
    ocp = self.ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(source_state(source))))

  def _restore(self, state, source):
    step = self.manager.latest_step()
    if step is None:
      return state, 0
    ocp = self.ocp
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state)), data=ocp.args.JsonRestore()))
    restore_source(source, out["data"])
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

  # -- logging --
  def _log(self, step: int, metrics: dict, writer) -> None:
    row = {"step": step}
    row.update({k: float(v) for k, v in metrics.items() if k != "finite"})
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if writer is not None:
      for k, v in row.items():
        if k != "step":
          writer.add_scalar(k, v, step)

  # -- main --
  def run(self) -> dict:
    cfg = self.cfg
    params = self._initial_params()
    ref_params = params if cfg.stage == "dpo" else None
    if ref_params is not None:
      ref_params = jax.tree_util.tree_map(jnp.copy, ref_params)
    state = self._initial_state(params)
    block0 = wsd.block_length_at(self.stages, 0)
    source = make_source(cfg, self.tokenizer, block0)
    state, start = self._restore(state, source)
    base_key = jax.random.PRNGKey(cfg.seed)
    lr = learning_rate(cfg)
    try:
      from tensorboardX import SummaryWriter
      writer = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
    except ImportError:  # pragma: no cover
      writer = None
    bar = None
    if self.progress:
      from tqdm import tqdm
      bar = tqdm(total=cfg.steps, initial=start, desc=f"train[{cfg.stage}]", unit="step")
    last = {}
    t_last, tokens = time.perf_counter(), 0
    try:
      for step in range(start, cfg.steps):
        if step == cfg.debug_kill_at_step:
          self.manager.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
        key = jax.random.fold_in(base_key, step)
        block = wsd.block_length_at(self.stages, step)
        state, metrics, n_tok = self._step(state, source, key, block, step, ref_params)
        tokens += n_tok
        if not bool(metrics["finite"]):
          raise NonFiniteLoss(
              f"non-finite loss at step {step}; stopped, the last good checkpoint is step "
              f"{self.manager.latest_step()}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
          now = time.perf_counter()
          metrics = dict(metrics, lr=lr(step), block_length=block,
                         tokens_per_s=tokens / max(now - t_last, 1e-9))
          t_last, tokens = now, 0
          self._log(done, metrics, writer)
          last = {k: float(v) for k, v in metrics.items()}
          if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}", block=block)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
          self._save(done, state, source)
        if bar is not None:
          bar.update(1)
    finally:
      self.manager.wait_until_finished()
      if bar is not None:
        bar.close()
      if writer is not None:
        writer.close()
    self.state = state
    if cfg.export_hf:
      llada_jax.save_hf_checkpoint(cfg.export_hf, self.c, state["params"])
      if hasattr(self.tokenizer, "save"):
        self.tokenizer.save(cfg.export_hf)
    return last

  def _step(self, state, source, key, block: int, step: int, ref_params):
    cfg = self.cfg
    oc = objective_config(cfg, block, step)
    if cfg.stage == "bdlm":
      batch = next(source)
      n_tok = int(np.asarray(batch["segment_ids"] >= 0).sum())
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
      state, metrics = bdlm_step(state, batch, key, c=self.c, oc=oc, optimizer=self.optimizer)
      return state, metrics, n_tok
    if cfg.stage == "dpo":
      chosen, rejected = source.next_pair()
      n_tok = int((chosen["segment_ids"] >= 0).sum() + (rejected["segment_ids"] >= 0).sum())
      state, metrics = dpo_step(state, ref_params, chosen, rejected, key, c=self.c, oc=oc,
                                optimizer=self.optimizer, beta=cfg.dpo.beta)
      return state, metrics, n_tok
    return self._ebpo_step(state, source, key, block, step)

  def _ebpo_step(self, state, source, key, block: int, step: int):
    cfg, e = self.cfg, self.cfg.ebpo
    ecfg = ebpo_lib.EBPOConfig(group_size=e.group_size, num_timesteps=e.num_timesteps,
                               eps_low=e.eps_low, eps_high=e.eps_high, block_length=block)
    prompts, answers = source.prompts()
    reward = getattr(toy_tasks, e.reward)

    def gen(flat):
      return llada_jax.generate(
          state["params"], self.c, flat, mode=e.mode, gen_length=e.gen_length,
          block_length=block, temperature=e.temperature, seed=step,
          eos_id=self.tokenizer.eos_id, mask_id=self.c.mask_token_id,
          editing_threshold=e.editing_threshold, threshold=e.threshold,
          max_post_steps=e.max_post_steps)

    def score(row, response):
      return reward(self.tokenizer.decode(response), answers[row // e.group_size])

    flat, responses, rewards = ebpo_lib.rollout(gen, prompts, e.group_size, score)
    adv = ebpo_lib.group_advantages(rewards).reshape(-1)
    batch = ebpo_lib.build_batch(flat, responses, cfg.data.seq_len, self.tokenizer.pad_id)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    masks_n, old = ebpo_old_logprobs(state["params"], batch, key, c=self.c, block_length=block,
                                     n=e.num_timesteps)
    for _ in range(e.updates_per_rollout):
      state, metrics = ebpo_step(state, batch, masks_n, old, jnp.asarray(adv), c=self.c,
                                 ecfg=ecfg, optimizer=self.optimizer)
    metrics = dict(metrics, reward=float(rewards.mean()))
    return state, metrics, int((np.asarray(batch["segment_ids"]) >= 0).sum())
