"""`llada_jax.LLM`: text in, text out, on the embedded model (bfloat16, as shipped)."""

import pytest

import llada_jax
from llada_jax.errors import InputError


@pytest.fixture(scope="module")
def llm():
  return llada_jax.LLM()


def test_generate_text_batch(llm):
  """A batch of two text prompts in one call (in bfloat16 on CPU this once failed inside XLA:
  no batched BF16 x BF16 = F32 dot); texts are the decoded tokens; a string prompt and its
  token ids give the same answer."""
  outs = llm.generate(["def fibonacci(n):", "import os\n"], mode="speedy", gen_length=32)
  assert len(outs) == 2
  for out in outs:
    assert out.text == llm.decode(out.token_ids) and 0 < len(out.token_ids) <= 32
    assert out.finish_reason in ("stop", "length") and out.nfe > 0
    assert out.tpf == pytest.approx(len(out.token_ids) / out.nfe)
  assert outs[0].prompt_token_ids == llm.encode("def fibonacci(n):")
  one = llm.generate("def fibonacci(n):", mode="speedy", gen_length=32)[0]
  ids = llm.generate(llm.encode("def fibonacci(n):"), mode="speedy", gen_length=32)[0]
  assert one.token_ids == ids.token_ids and one.nfe == ids.nfe


def test_chat_renders_the_template(llm):
  messages = [{"role": "system", "content": "You write Python."},
              {"role": "user", "content": "def square(x):"}]
  rendered = llm.apply_chat_template(messages)
  assert "You write Python." in rendered and rendered.index("You write") < rendered.index(
      "def square")
  out = llm.chat(messages, gen_length=32)[0]
  assert out.prompt_token_ids == llm.encode(rendered)
  assert out.token_ids == llm.generate(llm.encode(rendered), gen_length=32)[0].token_ids


@pytest.mark.parametrize("prompt, words", [("", "empty prompt"), (3.5, "a string or a list"),
                                           ([1, "a"], "a string or a list")])
def test_bad_prompts_are_one_line(llm, prompt, words):
  with pytest.raises(InputError, match=words):
    llm.generate([prompt])


def test_bad_settings_before_any_work(llm):
  with pytest.raises(InputError, match="percentage"):
    llm.generate("x", threshold=70)
  with pytest.raises(InputError, match="unknown decode setting"):
    llm.generate("x", gen_lenght=8)
