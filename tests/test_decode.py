"""Block-diffusion decoding: fixture parity (tokens and NFE), KV cache, batching, MBE, stats."""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import llada_jax
from llada_jax.decode.generate import decode_jit
from llada_jax.decode.settings import DecodeSettings
from conftest import FIXTURE_NAMES, expected_output, golden, run_kwargs

ALL_RUNS = [(name, i) for name in FIXTURE_NAMES for i in range(len(golden(name).runs()))]


@pytest.mark.parametrize("name, i", ALL_RUNS,
                         ids=[f"{n}-{golden(n).runs()[i]['name']}" for n, i in ALL_RUNS])
def test_fixture_generate_runs(name, i):
  g = golden(name)
  run = g.runs()[i]
  r = llada_jax.generate(g.params, g.config, [g.prompt], **run_kwargs(g, run))
  assert r.output_ids[0] == expected_output(g, run)
  assert r.nfe[0] == run["nfe"]
  assert r.tpf[0] == pytest.approx(len(r.output_ids[0]) / run["nfe"])


def test_compiles_once_per_shape(tiny):
  kw = dict(gen_length=20, block_length=8, mask_id=511, eos_id=510)
  llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], threshold=0.9, **kw)
  before = decode_jit._cache_size()
  a = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], threshold=0.5,
                         editing_threshold=0.1, max_post_steps=3, **kw)
  b = llada_jax.generate(tiny.params, tiny.config, [[5, 6, 7]], mode="speedy", seed=3,
                         eos_early_stop=False, **kw)
  assert decode_jit._cache_size() == before  # thresholds, budgets, prompts: no recompilation
  assert a.nfe != b.nfe or a.output_ids != b.output_ids
  llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], **dict(kw, gen_length=28))
  assert decode_jit._cache_size() == before + 1


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 509), min_size=1, max_size=8),
       st.sampled_from(["llada2.1", "llada2.0"]),
       st.floats(0.3, 0.95), st.floats(0.3, 0.95), st.integers(0, 4), st.integers(1, 8))
def test_cache_equals_recompute(prompt, algorithm, threshold, edit, post, steps):
  """The KV cache of finished blocks gives the same tokens and NFE as recomputing everything."""
  g = golden("llada2_tiny")
  kw = dict(algorithm=algorithm, gen_length=16, block_length=8, threshold=threshold,
            editing_threshold=edit, max_post_steps=post, steps=steps, eos_early_stop=False)
  a = llada_jax.generate(g.params, g.config, [prompt], **kw)
  b = llada_jax.generate(g.params, g.config, [prompt], use_cache=False, **kw)
  assert a.output_ids == b.output_ids and a.nfe == b.nfe


PROMPTS = [[115, 454, 150, 236, 25, 310, 300], [9] * 13, [4, 5], list(range(20, 37)), [300]]


@pytest.mark.parametrize("mode, mbe", [("quality", 1), ("speedy", 1), ("speedy", 2)])
def test_batch_invariance(tiny, mode, mbe):
  kw = dict(mode=mode, gen_length=16, block_length=8, mbe_window=mbe, batch_invariant=True)
  batch = llada_jax.generate(tiny.params, tiny.config, PROMPTS, **kw)
  for mix in ([0], [3], [2, 0], [4, 1, 3]):
    part = llada_jax.generate(tiny.params, tiny.config, [PROMPTS[i] for i in mix], **kw)
    for j, i in enumerate(mix):
      assert part.output_ids[j] == batch.output_ids[i], (mix, i)
      assert part.nfe[j] == batch.nfe[i]
      assert (part.fills[j], part.edits[j]) == (batch.fills[i], batch.edits[i])


def test_batched_rows_match_fixture(gold):
  """Fixture runs decoded as rows of one batch next to other prompts still match exactly."""
  run = next(r for r in gold.runs() if r["name"] == "v21_qmode_paper")
  kw = run_kwargs(gold, run)
  r = llada_jax.generate(gold.params, gold.config, [[3, 1, 4, 1, 5], gold.prompt, [7] * 11],
                         **kw)
  assert r.output_ids[1] == expected_output(gold, run) and r.nfe[1] == run["nfe"]


def test_rows_finish_independently(tiny):
  """An early-stopping row does not stop or change the others."""
  kw = dict(gen_length=24, block_length=8, batch_invariant=True, eos_early_stop=True)
  r = llada_jax.generate(tiny.params, tiny.config, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]],
                         **kw)
  assert r.output_ids[0][-1] == tiny.config.eos_token_id and len(r.output_ids[0]) < 24
  assert len(r.output_ids[1]) == 24 and r.nfe[1] > r.nfe[0]


@pytest.mark.parametrize("mbe", [1, 2, 3])
def test_mbe_invariants(tiny, mbe):
  prompts = PROMPTS[:4]
  r = llada_jax.generate(tiny.params, tiny.config, prompts, mode="speedy", gen_length=24,
                         block_length=8, mbe_window=mbe, trajectory=True, eos_early_stop=False)
  bl, mask = 8, tiny.config.mask_token_id
  for row, prompt in enumerate(prompts):
    steps = r.trajectory[row]
    assert len(steps) == r.nfe[row]
    assert sum(map(sum, (s["fill"] for s in steps))) == r.fills[row]
    assert sum(map(sum, (s["edit"] for s in steps))) == r.edits[row]
    assert mask not in r.output_ids[row]  # every mask filled at the end
    final = {}
    newest = -1
    for s in steps:
      newest = max(newest, s["start"] // bl + mbe - 1)
      for k, (tok, f, e) in enumerate(zip(s["tokens"], s["fill"], s["edit"])):
        p = s["start"] + k
        if f or e:
          assert p >= len(prompt)  # the prompt is never edited
          assert p // bl > newest - mbe  # only blocks inside the window change
        if p >= 0:
          final[p] = tok
    # committed blocks never change afterwards: the last value seen is the output
    for p, tok in final.items():
      if len(prompt) <= p < len(prompt) + len(r.output_ids[row]):
        assert r.output_ids[row][p - len(prompt)] == tok


def test_mbe_window_one_is_the_reference(tiny):
  run = next(r for r in tiny.runs() if r["name"] == "v21_speedy_like")
  r = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], mbe_window=1,
                         **run_kwargs(tiny, run))
  assert r.output_ids[0] == run["output_ids"] and r.nfe[0] == run["nfe"]


def test_mbe_cache_equals_recompute(tiny):
  kw = dict(mode="quality", gen_length=24, block_length=8, mbe_window=2)
  a = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:3], **kw)
  b = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:3], use_cache=False, **kw)
  assert a.output_ids == b.output_ids and a.nfe == b.nfe


def test_modes_and_overrides():
  q, s = DecodeSettings.for_mode("quality"), DecodeSettings.for_mode("speedy")
  assert (q.threshold, q.editing_threshold, q.max_post_steps) == (0.7, 0.5, 16)
  assert (s.threshold, s.editing_threshold, s.max_post_steps) == (0.5, 0.0, 16)
  assert q.block_length == s.block_length == 32 and q.eos_early_stop and q.temperature == 0
  assert DecodeSettings.for_mode("speedy", threshold=0.6).threshold == 0.6


def test_speedy_uses_fewer_forwards_than_quality(tiny):
  kw = dict(gen_length=32, block_length=8, eos_early_stop=False, batch_invariant=True)
  q = llada_jax.generate(tiny.params, tiny.config, PROMPTS, mode="quality", max_post_steps=0,
                         **kw)
  s = llada_jax.generate(tiny.params, tiny.config, PROMPTS, mode="speedy", max_post_steps=0,
                         **kw)
  assert sum(s.nfe) < sum(q.nfe)


def test_sampling_is_seeded(tiny):
  kw = dict(gen_length=16, block_length=8, temperature=1.0, top_k=50, top_p=0.9,
            eos_early_stop=False)
  a = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:2], seed=1, **kw)
  b = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:2], seed=1, **kw)
  c = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:2], seed=2, **kw)
  assert a.output_ids == b.output_ids
  assert a.output_ids != c.output_ids


def test_top_k_one_and_tiny_top_p_are_argmax(tiny):
  kw = dict(gen_length=16, block_length=8, temperature=0.7, eos_early_stop=False,
            max_post_steps=0)
  a = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:2], top_k=1, **kw)
  b = llada_jax.generate(tiny.params, tiny.config, PROMPTS[:2], top_p=1e-6, seed=5, **kw)
  assert a.output_ids == b.output_ids
  # All mass on one token gives confidence 1: each block is filled by its first forward.
  assert a.nfe == [3, 3]


def test_streaming_callback_reports_each_block(tiny):
  events = []
  r = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], gen_length=20,
                         block_length=8, eos_early_stop=False,
                         on_block=lambda rows, block, canvas, plen: events.append(
                             (rows.tolist(), block.tolist(), canvas[0].tolist())))
  assert [e[1][0] for e in events] == [0, 1, 2, 3]  # 7 + 20 tokens span 4 blocks of 8
  last = events[-1][2]
  assert last[7:27] == r.output_ids[0]


@pytest.mark.parametrize("prompts, kw, msg", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "non-empty list"),
    ([[1] * 500], {"gen_length": 64}, "exceeds the model context"),
    ([[1, 9999]], {}, "outside"),
    ([[1]], {"mode": "turbo"}, "unknown mode"),
    ([[1]], {"bogus": 1}, "unknown decode setting"),
    ([[1]], {"block_length": 0}, "block_length must be a positive integer"),
    ([[1]], {"algorithm": "llada3"}, "algorithm"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"eos_id": 511}, "must differ"),
])
def test_bad_inputs(tiny, prompts, kw, msg):
  with pytest.raises(ValueError, match=msg):
    llada_jax.generate(tiny.params, tiny.config, prompts, **kw)


def _predicts_its_mask(g):
  """The fixture's params with the LM head's mask-id column scaled up: argmax is the mask id."""
  params = jax.tree.map(lambda x: x, g.params)
  head = np.array(params["lm_head"])
  head[:, g.config.mask_token_id] = np.abs(head).max() * 50 * np.sign(head.sum(0).max() or 1)
  params["lm_head"] = jax.numpy.asarray(head)
  return params


@pytest.mark.parametrize("mode, algorithm", [("quality", "llada2.1"), ("speedy", "llada2.1"),
                                             ("quality", "llada2.0")])
def test_a_model_predicting_its_mask_ends_with_status_budget(tiny, mode, algorithm):
  """SPEC's reference keeps sampling (a filled mask stays a mask); what bounds the loop is the
  iteration budget (llada2.1) or the block's steps (llada2.0): rows end with finish 'budget',
  mask ids in the output, and a warning — never silently."""
  params = _predicts_its_mask(tiny)
  with pytest.warns(llada_jax.decode.api.BudgetWarning, match=r"row\(s\) \[0, 1\]"):
    r = llada_jax.generate(params, tiny.config, [tiny.prompt, tiny.prompt[:3]], mode=mode,
                           algorithm=algorithm, gen_length=16, block_length=8)
  assert r.finish == ["budget", "budget"]
  assert all(tiny.config.mask_token_id in ids for ids in r.output_ids)


def test_finish_status_eos_length_and_an_explicit_budget(tiny, recwarn):
  kw = dict(gen_length=32, block_length=8, mode="quality")
  r = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], eos_early_stop=False, **kw)
  eos = tiny.config.eos_token_id
  assert r.finish == ["eos" if r.output_ids[0][-1] == eos else "length"]
  assert tiny.config.mask_token_id not in r.output_ids[0]
  assert not [w for w in recwarn if issubclass(w.category, llada_jax.decode.api.BudgetWarning)]
  with pytest.warns(llada_jax.decode.api.BudgetWarning):
    short = llada_jax.generate(tiny.params, tiny.config, [tiny.prompt], max_iterations=3, **kw)
  assert short.finish == ["budget"] and short.nfe[0] <= 3


def test_prompt_buckets():
  """Buckets never cut a prompt, pad at most a third of a bucket, grow monotonically, and stay
  few (two per doubling: one compilation each); block-aligned prompts of 1-4 blocks and of
  4 or 6 times a power of two blocks (768 tokens at block 32) are not padded at all."""
  from llada_jax.decode.api import prompt_bucket
  for bl in (1, 4, 32):
    sizes = [prompt_bucket(n, bl) for n in range(1, 4096)]
    assert all(b >= n and b % bl == 0 for n, b in enumerate(sizes, 1))
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all((b - n) <= b / 3 or b <= 4 * bl for n, b in enumerate(sizes, 1))
    assert len(set(sizes)) <= 2 * (4096 // bl).bit_length() + 4
  assert prompt_bucket(768, 32) == 768 and prompt_bucket(96, 32) == 96
  assert prompt_bucket(769, 32) == 1024 and prompt_bucket(129, 32) == 192
