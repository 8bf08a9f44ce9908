"""Text <-> token ids with a checkpoint's `tokenizer.json` and optional chat template."""

from __future__ import annotations

import json
import os

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer`; `chat_template` is a Jinja template or None."""

  def __init__(self, tok, chat_template: str | None = None):
    self._tok = tok
    self.chat_template = chat_template

  @classmethod
  def from_dir(cls, path: str) -> "Tokenizer":
    """Loads `path/tokenizer.json` and the `chat_template` of `tokenizer_config.json` (or of a
    `chat_template.jinja` file) when present."""
    from tokenizers import Tokenizer as HFTokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"no tokenizer.json in {path}")
    template = None
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg):
      with open(cfg) as f:
        template = json.load(f).get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
      with open(jinja) as f:
        template = f.read()
    return cls(HFTokenizer.from_file(file), template)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def apply_chat_template(self, user_text: str) -> str:
    """Renders a single user turn followed by the assistant prompt."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(self.chat_template).render(
        messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
        bos_token="", eos_token="")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()
