"""Trajectory pictures (`llada_jax.visualize`) and the benchmark harness (`experiments/harness.py`)
on the tiny fixture checkpoint."""

import os
import sys

import pytest

import llada_jax
from llada_jax import visualize
from llada_jax.train.data import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "llada2_tiny")
PROMPT = [115, 454, 150, 236, 25, 310, 300]
# the fixture's vocabulary is 512 ids: bytes, then 510 = EOS/pad and 511 = mask
TOKENIZER = ByteTokenizer(eos_id=510, pad_id=510, mask_id=511, vocab_size=512)


@pytest.fixture(scope="module")
def model():
  return llada_jax.load_hf_checkpoint(TINY)


# quality: the reference settings; speedy with a low threshold: the random model then edits
SETTINGS = {"quality": dict(mode="quality"),
            "speedy": dict(mode="speedy", threshold=0.05, max_post_steps=4)}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def decoded(request, model):
  config, params = model
  result = llada_jax.generate(params, config, [PROMPT], trajectory=True, gen_length=16,
                              block_length=8, **SETTINGS[request.param])
  return request.param, result


def test_html_has_one_row_per_forward_and_marks_every_fill_and_edit(decoded):
  name, result = decoded
  steps = result.trajectory[0]
  assert len(steps) == result.nfe[0] > 0
  page = visualize.trajectory_html(result, 0)
  assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
  assert "<script" not in page and "http" not in page  # self-contained
  assert page.count('<tr class="fwd">') == result.nfe[0]
  for k in range(1, result.nfe[0] + 1):
    assert f">step {k}<" in page
  assert page.count('class="tok fill"') == result.fills[0] == sum(sum(s["fill"]) for s in steps)
  assert page.count('class="tok edit"') == result.edits[0] == sum(sum(s["edit"]) for s in steps)
  if name == "speedy":
    assert result.edits[0] > 0  # the case exercises edit marking
  final = " ".join(map(str, result.output_ids[0]))
  assert final in page


def test_html_with_tokenizer_and_prompt_shows_text(decoded):
  _, result = decoded
  page = visualize.trajectory_html(result, 0, TOKENIZER, prompt=PROMPT)
  assert page.count('<tr class="fwd">') == result.nfe[0]
  assert page.count('class="tok fill"') == result.fills[0]
  assert page.count('class="tok edit"') == result.edits[0]
  import html
  assert html.escape(TOKENIZER.decode(result.output_ids[0])) in page
  assert 'class="tok prompt"' in page  # the prompt's last partial block is in the window


def test_png_is_written(decoded, tmp_path):
  _, result = decoded
  path = visualize.trajectory_png(result, 0, str(tmp_path / "traj.png"), tokenizer=TOKENIZER)
  data = open(path, "rb").read()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_states_match_the_trajectory(decoded):
  _, result = decoded
  states, tokens, lo = visualize.trajectory_grid(result, 0)
  assert len(states) == result.nfe[0]
  assert sum(row.count(visualize.FILL) for row in states) == result.fills[0]
  assert sum(row.count(visualize.EDIT) for row in states) == result.edits[0]
  last = result.trajectory[0][-1]
  for j, t in enumerate(last["tokens"]):
    assert tokens[-1][last["start"] + j - lo] == t


def test_no_trajectory_is_a_clear_error(model):
  config, params = model
  result = llada_jax.generate(params, config, [PROMPT], gen_length=8, block_length=8)
  with pytest.raises(ValueError, match="trajectory=True"):
    visualize.trajectory_html(result, 0)


def test_harness_accuracy_on_a_hand_made_task_list(model):
  sys.path.insert(0, ROOT)
  from experiments.harness import evaluate_setting
  config, params = model
  prompts = ["ab", "cd=", "x+y=", "q"]
  kw = dict(mode="quality", gen_length=8, block_length=8, batch_invariant=True)
  ref = llada_jax.generate(params, config, [TOKENIZER.encode(p) for p in prompts], **kw)
  texts = [TOKENIZER.decode(o).strip() for o in ref.output_ids]
  # rows 0, 1, 3 get their decoded text as the answer (right), row 2 a different one (wrong)
  examples = [("t1", prompts[0], texts[0]), ("t1", prompts[1], texts[1]),
              ("t2", prompts[2], texts[2] + "#wrong"), ("t2", prompts[3], texts[3])]
  row = evaluate_setting(params, config, examples, TOKENIZER, name="hand", keep_outputs=True,
                         **kw)
  assert row["accuracy"] == pytest.approx(0.75)
  assert row["accuracy_by_task"] == {"t1": 1.0, "t2": 0.5}
  assert [o["score"] for o in row["outputs"]] == [1.0, 1.0, 0.0, 1.0]
  assert row["n"] == row["batch_size"] == 4
  assert row["tokens"] == sum(map(len, ref.output_ids))
  assert row["mean_tpf"] == pytest.approx(sum(ref.tpf) / 4)
  assert row["edits"] == sum(ref.edits) and row["fills"] == sum(ref.fills)
  assert row["run_s"] > 0 and row["first_call_s"] > 0 and row["compile_s"] >= 0
  assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["run_s"])
  assert isinstance(row["compiled"], bool)
  assert row["jax_version"] == row["hardware"]["jax"]
  assert row["hardware"]["cores"] >= 1 and row["hardware"]["processor"]
  assert row["settings"]["temperature"] == 0.0
  # chunked decoding (batch 2) scores the same
  chunked = evaluate_setting(params, config, [e[1:] for e in examples], TOKENIZER,
                             batch_size=2, **kw)
  assert chunked["batch_size"] == 2 and chunked["accuracy"] == pytest.approx(0.75)
  assert chunked["accuracy_by_task"] == {"all": 0.75}
