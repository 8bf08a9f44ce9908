"""Text <-> token ids with a checkpoint's `tokenizer.json` and optional chat template."""

from __future__ import annotations

import json
import os

from llada_jax.errors import InputError, describe_value, one_line

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer`; `chat_template` is a Jinja template or None.

  Bad files raise one `InputError` naming the file: an unreadable `tokenizer.json` or
  `tokenizer_config.json`, a chat template that is not a string, or that has a Jinja syntax
  error (checked by `check_chat_template` or on first use)."""

  def __init__(self, tok, chat_template: str | None = None, template_source: str | None = None):
    self._tok = tok
    self.chat_template = chat_template
    self.template_source = template_source or "the chat template"
    self._compiled = None  # (template text, compiled jinja2 template)

  @classmethod
  def from_dir(cls, path: str) -> "Tokenizer":
    """Loads `path/tokenizer.json` and the `chat_template` of `tokenizer_config.json` (or of a
    `chat_template.jinja` file) when present."""
    from tokenizers import Tokenizer as HFTokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"no tokenizer.json in {path}")
    template, source = None, None
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg):
      template = _chat_template_of(_read_json(cfg), cfg)
      source = cfg
    jinja = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
      try:
        with open(jinja, encoding="utf-8") as f:
          template = f.read()
      except UnicodeDecodeError as e:
        raise InputError(f"{jinja} is not UTF-8 text ({e.reason} at byte {e.start})") from None
      source = jinja
    with open(file, "rb"):  # a missing permission is an OSError naming the file
      pass
    try:
      tok = HFTokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 (the Rust library raises plain Exception)
      raise InputError(f"{file} is not a valid tokenizer.json ({one_line(e)[:300]})") from None
    return cls(tok, template, source)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def check_chat_template(self):
    """Compiles the chat template (once); a syntax error raises one `InputError` naming the
    file and the line."""
    if self.chat_template is None:
      raise InputError("this tokenizer has no chat template")
    if self._compiled is None or self._compiled[0] != self.chat_template:
      import jinja2
      env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = _raise_exception  # as Hugging Face templates expect
      try:
        self._compiled = (self.chat_template, env.from_string(self.chat_template))
      except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{self.template_source}: chat template syntax error at line "
                         f"{e.lineno}: {one_line(e.message)}") from None
    return self._compiled[1]

  def apply_chat_template(self, user_text: str) -> str:
    """Renders a single user turn followed by the assistant prompt."""
    import jinja2
    template = self.check_chat_template()
    try:
      return template.render(
          messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
          bos_token="", eos_token="")
    except jinja2.TemplateError as e:
      raise InputError(f"{self.template_source}: the chat template failed to render "
                       f"({type(e).__name__}: {one_line(e)})") from None

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()


def _read_json(file: str):
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{file} is not valid JSON ({e})") from None
  except UnicodeDecodeError as e:
    raise InputError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _chat_template_of(cfg, file: str) -> str | None:
  """The `chat_template` of a parsed `tokenizer_config.json`: a string, or Hugging Face's list
  of named templates (the one named "default")."""
  if not isinstance(cfg, dict):
    raise InputError(f"{file} must hold a JSON object, got {describe_value(cfg)[:80]}")
  t = cfg.get("chat_template")
  if isinstance(t, list) and all(isinstance(x, dict) for x in t):
    t = next((x.get("template") for x in t if x.get("name") == "default"), None)
  if t is not None and not isinstance(t, str):
    raise InputError(f"{file}: chat_template must be a string (a Jinja template) or a list of "
                     f"named templates with a 'default' one, got {describe_value(t)[:80]}")
  return t


def _raise_exception(message):
  import jinja2
  raise jinja2.TemplateError(message)
