"""The training memory plan (`llada_jax.train.plan`) against XLA's compiled memory analysis of
the step the trainer runs, on this CPU host (one device, fp32, no remat: XLA:CPU's scheduler
is not memory-aware, so a remat figure from it is no reference)."""

import jax
import jax.numpy as jnp
import pytest

from llada_jax.train import plan as plan_lib
from llada_jax.train import sharding, steps, trainer
from llada_jax.train.defaults import base_config

MODEL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=128,
             num_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1, pad_token_id=0,
             eos_token_id=1, mask_token_id=2, max_position_embeddings=4096)


def _config(block_length, accum=1):
  c = base_config()
  c.model.overrides.update(MODEL)
  c.data.task = "repeat"
  c.data.seq_len, c.data.batch_size = 1024, 2 * accum
  c.grad_accum_steps = accum
  c.objective.block_length = block_length
  c.objective.attention_impl, c.objective.moe_impl = "xla", "ragged"
  return c


def _xla_bytes(cfg) -> int:
  """Arguments + temporaries of the compiled trainer step (outputs alias the donated state)."""
  tp = sharding.setup(cfg)
  c = trainer.model_config(cfg)
  optimizer = trainer.make_optimizer(cfg)
  abstract, shardings = sharding.state_shardings(tp, c, optimizer)
  compiled = steps.CompiledSteps("bdlm", optimizer, shardings, tp.mesh, rows_spec=tp.rows)
  rows = tp.rows((cfg.data.batch_size, cfg.data.seq_len))
  tok = lambda dt: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), dt,
                                        sharding=rows)
  batch = dict(tokens=tok(jnp.int32), segment_ids=tok(jnp.int32), positions=tok(jnp.int32),
               loss_mask=tok(jnp.bool_))
  spec = steps.StepSpec(c, oc=trainer.objective_config(cfg, cfg.objective.block_length, 0),
                        accum=cfg.grad_accum_steps)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=tp.replicated())
  m = compiled.lower(spec, abstract, batch, key).compile().memory_analysis()
  return m.argument_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.parametrize("block_length, accum", [(32, 1), (1024, 1), (32, 2)],
                         ids=["2L-block32", "MDLM", "2L-accum2"])
def test_plan_is_within_25_percent_of_xla(block_length, accum):
  cfg = _config(block_length, accum)
  planned = plan_lib.plan_train(cfg, "data=1")
  xla = _xla_bytes(cfg)
  assert abs(planned["total"] - xla) <= 0.25 * xla, (planned, xla)


def test_plan_follows_the_layout_remat_accumulation_and_mesh():
  two_l, mdlm = plan_lib.plan_train(_config(32), "data=1"), plan_lib.plan_train(_config(1024),
                                                                                 "data=1")
  assert two_l["activations"] > 1.8 * mdlm["activations"]  # twice the tokens, longer keys
  assert two_l["logits"] == mdlm["logits"]  # logits only on the noisy half
  cfg = _config(32)
  cfg.objective.remat = True
  assert plan_lib.plan_train(cfg, "data=1")["activations"] < 0.7 * two_l["activations"]
  acc = plan_lib.plan_train(_config(32, accum=4), "data=1")
  assert acc["grads"] == 2 * two_l["grads"]  # the accumulator
  assert acc["activations"] == two_l["activations"]  # one micro-batch of 2 rows at a time
  sharded = plan_lib.plan_train(_config(32), "fsdp=2,expert=4")
  assert sharded["params"] < two_l["params"] / 3 and sharded["opt_state"] < two_l["opt_state"] / 3
  masters = base_config()
  masters.model.preset, masters.dtype = "llada2_1_mini", "bfloat16"
  p = plan_lib.plan_train(masters, "fsdp=8")  # fp32 masters: 4 bytes per param, twice for Adam
  assert p["opt_state"] == pytest.approx(2 * p["params"], rel=1e-3)
