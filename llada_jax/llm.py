"""`LLM`: text in, text out, in the convention of `vllm.LLM`.

    llm = llada_jax.LLM()                       # the embedded default model, or
    llm = llada_jax.LLM("inclusionAI/LLaDA2.1-mini", mesh="auto", dtype="bfloat16")
    out = llm.generate(["def fibonacci(n):"], mode="speedy", gen_length=64)
    print(out[0].text, out[0].nfe, out[0].tpf)
    out = llm.chat([{"role": "user", "content": "Write a quicksort in Python."}])

`generate` decodes a batch in one compiled loop (`llada_jax.generate`); `engine()` builds the
continuous-batching engine the server runs (`llada_jax.serve.engine.Engine`), on the same
params and mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from llada_jax.errors import InputError

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "default_model")


@dataclasses.dataclass
class Completion:
  """One prompt's result. `finish_reason` is OpenAI's: "stop" (an EOS ended it), "length"
  (max tokens reached) or "budget" (the iteration budget ran out; see `GenerateResult`)."""

  text: str
  token_ids: list[int]
  prompt_token_ids: list[int]
  nfe: int
  tpf: float
  fills: int
  edits: int
  finish_reason: str


FINISH_REASONS = {"eos": "stop", "length": "length", "budget": "budget",
                  "cancelled": "cancelled"}


class LLM:
  """A loaded checkpoint with its tokenizer and chat template.

  Args:
    checkpoint: a HF checkpoint directory or hub id (default: the embedded model).
    mesh: None (one device), "auto", a spec such as "data=2,expert=4", or a `Mesh`: params are
      loaded shard by shard onto it and every decode runs on it.
    dtype: compute/param dtype override ("bfloat16", "float32").
    attention_impl, moe_impl, sampler_impl: as `llada_jax.generate`.
    chat: whether `generate` applies the chat template to text prompts (default: never; `chat`
      always does).
  """

  def __init__(self, checkpoint: str | None = None, *, mesh=None, dtype: str | None = None,
               attention_impl: str = "auto", moe_impl: str = "auto",
               sampler_impl: str = "logits"):
    import llada_jax  # noqa: PLC0415
    from llada_jax import parallel  # noqa: PLC0415
    from llada_jax.tokenizer import Tokenizer  # noqa: PLC0415
    if checkpoint is None:
      path = DEFAULT_CHECKPOINT
      if not os.path.isdir(path):
        raise InputError("no checkpoint given and no embedded default model is installed")
    else:
      from llada_jax.checkpoint import resolve_checkpoint  # noqa: PLC0415
      path = resolve_checkpoint(checkpoint)
    self.checkpoint = path
    self.name = checkpoint or "llada-default"
    self.tokenizer = (Tokenizer.from_dir(path)
                      if os.path.exists(os.path.join(path, "tokenizer.json")) else None)
    mesh_obj = None
    if mesh is not None:
      mesh_obj = parallel.mesh_for_checkpoint(mesh, path, dtype=dtype)
    self.mesh = mesh_obj
    self.config, self.params = llada_jax.load_hf_checkpoint(path, dtype=dtype, mesh=mesh_obj)
    self.impls = dict(attention_impl=attention_impl, moe_impl=moe_impl,
                      sampler_impl=sampler_impl)

  # ---- text <-> ids -----------------------------------------------------------------------------
  def _need_tokenizer(self):
    if self.tokenizer is None:
      raise InputError(f"text prompts need a tokenizer.json in {self.checkpoint}; pass token "
                       "id lists instead")
    return self.tokenizer

  def encode(self, text: str) -> list[int]:
    return self._need_tokenizer().encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._need_tokenizer().decode(list(ids)) if self.tokenizer else " ".join(
        map(str, ids))

  def apply_chat_template(self, messages: list[dict[str, Any]], *,
                          add_generation_prompt: bool = True) -> str:
    return self._need_tokenizer().apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt)

  def prompt_ids(self, prompt) -> list[int]:
    """A text prompt (tokenised as it is) or a list of token ids."""
    if isinstance(prompt, str):
      if not prompt:
        raise InputError("empty prompt")
      return self.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in prompt):
      return list(prompt)
    raise InputError(f"a prompt must be a string or a list of token ids, got "
                     f"{type(prompt).__name__}")

  # ---- decoding ---------------------------------------------------------------------------------
  def generate(self, prompts, *, mode: str = "quality", **settings) -> list[Completion]:
    """Decodes `prompts` (a string, a list of strings, or of token-id lists) as one batch.
    `settings` are `DecodeSettings` fields (gen_length, threshold, block_length, seed, ...)."""
    import llada_jax  # noqa: PLC0415
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], int)):
      prompts = [prompts]
    ids = [self.prompt_ids(p) for p in prompts]
    if not ids:
      return []
    result = llada_jax.generate(self.params, self.config, ids, mode=mode, mesh=self.mesh,
                                **self.impls, **settings)
    return [Completion(text=self.decode(out), token_ids=out, prompt_token_ids=ids[i],
                       nfe=result.nfe[i], tpf=result.tpf[i], fills=result.fills[i],
                       edits=result.edits[i], finish_reason=FINISH_REASONS[result.finish[i]])
            for i, out in enumerate(result.output_ids)]

  def chat(self, conversations, *, mode: str = "quality", **settings) -> list[Completion]:
    """One conversation (a list of {"role", "content"} messages) or a list of them, rendered
    with the checkpoint's chat template and answered."""
    if conversations and isinstance(conversations[0], dict):
      conversations = [conversations]
    prompts = [self.encode(self.apply_chat_template(m)) for m in conversations]
    return self.generate(prompts, mode=mode, **settings)

  def engine(self, *, slots: int = 8, max_length: int | None = None, chunk: int = 8,
             mode: str = "quality", **settings):
    """The continuous-batching engine on these params (`llada_jax.serve.engine.Engine`);
    `mode` and `settings` give its fixed and default decode settings."""
    from llada_jax.decode.settings import DecodeSettings  # noqa: PLC0415
    from llada_jax.serve.engine import Engine  # noqa: PLC0415
    return Engine(self.params, self.config, settings=DecodeSettings.for_mode(mode, **settings),
                  slots=slots, max_length=max_length, chunk=chunk, mesh=self.mesh,
                  **self.impls)
