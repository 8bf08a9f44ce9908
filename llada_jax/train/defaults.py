"""The default training config; the files under `configs/` start from it and change a few keys."""

from __future__ import annotations

import ml_collections

from llada_jax.parallel.rules import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "bdlm"  # bdlm (AR / WSD / MDLM / SFT with editing) | dpo | ebpo
  c.seed = 0
  c.steps = 100
  c.workdir = ""
  c.init_from = ""  # HF checkpoint directory to start from ("" = random init)
  c.model = ml_collections.ConfigDict(dict(preset="tiny", overrides=ml_collections.ConfigDict()))
  # Master params and optimizer moments ("bfloat16": pure-bf16 training, half the memory, with a
  # warning) and the compute dtype the step casts them to ("bfloat16" on TPU).
  c.param_dtype = "float32"
  c.dtype = "float32"
  c.tokenizer = "bytes"  # "bytes" or a directory holding tokenizer.json
  c.data = ml_collections.ConfigDict(dict(
      # text file, directory of text files, or JSONL; for dpo / ebpo also a prepared tfds dataset
      source="",
      dataset_dir="",  # where the tfds array_record dataset is written ("" = workdir/dataset)
      name="corpus",
      kind="pretrain",  # pretrain (packed documents) | sft (prompt never masked)
      task="",  # a toy task (llada_jax.train.toy_tasks) instead of a corpus
      # "block": EOS repeated up to the end of the answer's block, as the decoder fills a whole
      # block (toy tasks, preference pairs, EBPO's scored rollouts)
      eos_padding="none",
      seq_len=64,
      batch_size=8,  # the global batch (all processes, all micro-batches)
      # Corpora: the global batch is read as `shards` fixed slices, shard k from the k-th
      # 1/shards of the documents (0 = one per process). Runs with the same value read the same
      # batches whatever their process count.
      shards=0,
      # Held out from a corpus for evaluation (the `validation` split, never trained on).
      validation_fraction=0.0,
      # SFT (kind="sft"): pad each example to a multiple of the block and train the padding
      # (the paper's SFT; the decoder then fills whole blocks), and pack several examples per
      # row (grain first-fit packing; each starts on a block boundary with block_padding).
      block_padding=False,
      pack=False,
      # Preference pairs (dpo) and prompt sets (ebpo): a bad record (missing field, empty
      # answer, too long for seq_len) is an error naming its line ("error") or is left out and
      # counted in the metrics as data_skipped ("skip").
      bad_records="error"))
  c.objective = ml_collections.ConfigDict(dict(
      block_length=32, t_min=0.3, t_max=0.8, weighting="token_mean", complementary=False,
      edit_rate=0.0, mtf_rate=0.0, edit_weight=1.0, keep_weight=1.0, cap_weight=0.0,
      mask_embed_noise=0.0,
      # attention_impl: "auto" (the Pallas kernel on TPU, XLA elsewhere), "xla", "pallas", ...
      # moe_impl: "auto" (expert parallel when the mesh has an expert axis, else the backend's
      # local path: ragged_dot on TPU, dense or sorted tiles elsewhere), "ragged", "dense",
      # "ep" / "ep_ragged" (expert parallel over the mesh's expert axis).
      attention_impl="auto", remat=False, moe_impl="auto"))
  c.noise_steps = 0  # mask_embed_noise applies to the first noise_steps steps only
  c.wsd = ml_collections.ConfigDict(dict(enabled=False, stages=((0, 1),)))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="cosine", warmup_steps=10, decay_fraction=0.2, final_lr_fraction=0.1,
      weight_decay=0.01, clip=1.0, b1=0.9, b2=0.95))
  # reference: "online" (the frozen reference's ELBOs at every step, with the policy's noise) or
  # "precomputed" (once per pair before training, with per-record noise: a pair gets the same
  # draw each epoch, and no reference params stay on the devices; needs data.source).
  c.dpo = ml_collections.ConfigDict(dict(beta=0.1, reference="online"))
  # EBPO: G rollouts per prompt from our decoder (mode, thresholds: the decode settings; T2T
  # editing off with editing_threshold=1.0, which a model trained without the editing objective
  # needs: LLaDA2.0 checkpoints, edit_rate = mtf_rate = 0), N timesteps per log-ratio with
  # weights w_n (() = equal), the ratio clipped per block, per sequence or as the summed
  # formula, the masks complementary in timestep pairs (noise="complementary", the lowest
  # gradient variance), shared by a prompt's rollouts ("group") or drawn per row
  # ("independent") (llada_jax.train.ebpo).
  c.ebpo = ml_collections.ConfigDict(dict(
      group_size=8, num_timesteps=2, timestep_weights=(), eps_low=0.2, eps_high=0.28,
      ratio_level="block", noise="complementary", updates_per_rollout=2, gen_length=16,
      mode="speedy", temperature=1.0, threshold=0.5, editing_threshold=0.5, max_post_steps=2))
  # The EBPO reward by name (llada_jax.train.rewards): exact_match, math, code (the record's
  # tests run in a sandboxed subprocess), char_overlap, match_any.
  c.reward = "char_overlap"
  c.grad_accum_steps = 1  # micro-batches per step (lax.scan inside the step; one update)
  # MoE expert-bias balancing (bdlm stage): after each step every MoE layer's router
  # `expert_bias` moves by +rate for experts below the layer's mean load, -rate above it
  # (aux-loss-free balancing). 0 keeps the biases as loaded; they never get a gradient step or
  # weight decay. The per-layer loads are in metrics.jsonl (expert_tokens, expert_load_max/min).
  c.moe_bias_rate = 0.0
  c.log_every = 10
  # Held-out evaluation every eval_every steps (0 = off; bdlm stage): eval_loss, eval_accuracy,
  # ... over eval_batches batches of the validation split (toy tasks: another seed), logged to
  # metrics.jsonl and TensorBoard.
  c.eval_every = 0
  c.eval_batches = 2
  c.ckpt_every = 50
  c.keep = 3
  c.export_hf = ""
  c.debug_kill_at_step = -1  # testing: SIGKILL the process at this step
  c.debug_term_at_step = -1  # testing: SIGTERM the process at this step (preemption)
  # Device mesh, e.g. "data=2,expert=4" or "fsdp=-1,expert=8": the train state and the batch are
  # sharded over it by the logical-axis rules ("" = one device). `rules` overrides entries of
  # `llada_jax.parallel.rules.DEFAULT_RULES` (logical name -> "axis,axis" or "").
  c.mesh = ""
  c.rules = ml_collections.ConfigDict({k: ",".join(v) for k, v in DEFAULT_RULES.items()})
  return c


def tiny_byte_config(stage: str = "bdlm") -> ml_collections.ConfigDict:
  """A CPU-sized config on byte-level ids (vocab 264: bytes, eos 256, pad 257, mask 258)."""
  c = base_config()
  c.stage = stage
  c.model.overrides.update(dict(vocab_size=264, pad_token_id=257, eos_token_id=256,
                                mask_token_id=258))
  c.data.task = "addition"
  c.data.seq_len = 32
  c.data.batch_size = 16
  c.objective.block_length = 8
  c.optim.lr = 3e-3
  c.steps = 60
  c.log_every = 10
  c.ckpt_every = 20
  return c


def code_model_config(corpus: str = "stdlib_code", *, editing: bool = True
                      ) -> ml_collections.ConfigDict:
  """What the default code model's stages (`configs/code_*.py`) share: the corpus `corpus`
  (`stdlib_code` or `idiom_mix`) in rows of 128 tokens, 8 per batch, block 32, t in [0.1, 1],
  warmup 20, logs every 20 steps (the base config's cosine schedule); with `editing` the
  LLaDA2.1 mixed objective (10% of the visible tokens corrupted with random ids, `edit_weight` =
  `keep_weight` = 1, no MTF: its self-drafts cost a second forward)."""
  c = base_config()
  c.data.kind = "pretrain"
  c.data.name = corpus
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.objective.block_length = 32
  c.objective.t_min = 0.1
  c.objective.t_max = 1.0
  c.optim.warmup_steps = 20
  c.log_every = 20
  if editing:
    c.objective.edit_rate = 0.1
    c.objective.mtf_rate = 0.0
    c.objective.edit_weight = 1.0
    c.objective.keep_weight = 1.0
  return c


def pod_config(size: str, stage: str) -> ml_collections.ConfigDict:
  """A TPU-pod config for the full-size models (`size` mini or flash), bf16, remat, from an HF
  checkpoint given with --config.init_from and a corpus with --config.data.source."""
  c = base_config()
  c.stage = stage
  c.model.preset = {"mini": "llada2_1_mini", "flash": "llada2_1_flash"}[size]
  c.param_dtype = "float32"  # fp32 master weights and moments, bf16 compute
  c.dtype = "bfloat16"
  c.objective.remat = True
  c.objective.attention_impl = "auto"  # the Pallas kernel under shard_map on TPU
  c.objective.moe_impl = "auto"  # expert parallel (ragged_all_to_all on TPU) over `expert`
  c.data.seq_len = 4096
  c.data.batch_size = 256 if size == "mini" else 512
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 100
  c.log_every = 10
  c.ckpt_every = 500
  c.keep = 5
  c.mesh = "fsdp=-1,expert=8" if size == "mini" else "fsdp=-1,expert=16,tensor=4"
  c.moe_bias_rate = 1e-3 if stage == "bdlm" else 0.0
  return c
