"""Text <-> token ids with a checkpoint's `tokenizer.json` and optional chat template."""

from __future__ import annotations

import json
import os

from llada_jax.errors import InputError, describe_value, one_line

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# The files of a tokenizer directory (those present are copied next to exported weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")


def copy_tokenizer(src: str, dst: str) -> list[str]:
  """Copies the tokenizer files of directory `src` (those of `TOKENIZER_FILES` present) into
  `dst`; returns their names."""
  import shutil  # noqa: PLC0415
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return names


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer`; `chat_template` is a Jinja template or None.

  Bad files raise one `InputError` naming the file: an unreadable `tokenizer.json` or
  `tokenizer_config.json`, a chat template that is not a string, or that has a Jinja syntax
  error (checked by `check_chat_template` or on first use)."""

  def __init__(self, tok, chat_template: str | None = None, template_source: str | None = None,
               special_tokens: dict[str, str] | None = None):
    self._tok = tok
    self.chat_template = chat_template
    self.template_source = template_source or "the chat template"
    # bos_token, eos_token, pad_token, unk_token, ... as the template sees them
    self.special_tokens = dict(special_tokens or {})
    self._compiled = None  # (template text, compiled jinja2 template)
    self.named_templates: dict[str, str] = {}  # a list of named templates: name -> text

  @classmethod
  def from_dir(cls, path: str) -> "Tokenizer":
    """Loads `path/tokenizer.json` and the `chat_template` of `tokenizer_config.json` (or of a
    `chat_template.jinja` file) when present."""
    from tokenizers import Tokenizer as HFTokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"no tokenizer.json in {path}")
    template, source, special, named = None, None, {}, {}
    cfg = os.path.join(path, "tokenizer_config.json")
    legacy = os.path.join(path, "special_tokens_map.json")
    if os.path.exists(legacy):  # older checkpoints keep the special tokens here
      special = _special_tokens_of(_read_json(legacy), legacy)
    if os.path.exists(cfg):
      parsed = _read_json(cfg)
      template, named = _chat_template_of(parsed, cfg)
      source = cfg
      special.update(_special_tokens_of(parsed, cfg))
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):  # the separate file wins, as in transformers
      try:
        with open(jinja, encoding="utf-8") as f:
          template = f.read()
      except UnicodeDecodeError as e:
        raise InputError(f"{jinja} is not UTF-8 text ({e.reason} at byte {e.start})") from None
      source, named = jinja, {}
    with open(file, "rb"):  # a missing permission is an OSError naming the file
      pass
    try:
      tok = HFTokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 (the Rust library raises plain Exception)
      raise InputError(f"{file} is not a valid tokenizer.json ({one_line(e)[:300]})") from None
    out = cls(tok, template, source, special)
    out.named_templates = named
    return out

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def check_chat_template(self):
    """Compiles the chat template (once) as Hugging Face does: a sandboxed Jinja environment
    with `trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, the `tojson` filter and
    the `raise_exception` / `strftime_now` globals. A syntax error raises one `InputError`
    naming the file and the line."""
    if self.chat_template is None:
      raise InputError("this tokenizer has no chat template")
    if self._compiled is None or self._compiled[0] != self.chat_template:
      import jinja2
      try:
        self._compiled = (self.chat_template, chat_environment().from_string(self.chat_template))
      except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{self.template_source}: chat template syntax error at line "
                         f"{e.lineno}: {one_line(e.message)}") from None
    return self._compiled[1]

  def apply_chat_template(self, messages, *, add_generation_prompt: bool = True,
                          **kwargs) -> str:
    """Renders `messages` (a list of {"role", "content"} dicts: system / user / assistant turns;
    a plain string is one user turn) with the special tokens of `tokenizer_config.json`
    (`bos_token`, `eos_token`, ...) and `add_generation_prompt`, as `transformers`'
    `apply_chat_template(..., tokenize=False)`; extra `kwargs` reach the template too."""
    import jinja2
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    _check_messages(messages)
    messages = [_normalise_message(m) for m in messages]
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    if kwargs["tools"] is not None and "tool_use" in self.named_templates:
      template = chat_environment().from_string(self.named_templates["tool_use"])
    else:
      template = self.check_chat_template()
    try:
      return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                             **{**self.special_tokens, **kwargs})
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


def _chat_template_of(cfg, file: str) -> tuple[str | None, dict[str, str]]:
  """The `chat_template` of a parsed `tokenizer_config.json` and its named templates: a string,
  or Hugging Face's list of named templates (the one named "default" is the template)."""
  if not isinstance(cfg, dict):
    raise InputError(f"{file} must hold a JSON object, got {describe_value(cfg)[:80]}")
  t = cfg.get("chat_template")
  named = {}
  if isinstance(t, list) and all(isinstance(x, dict) for x in t):
    named = {x.get("name"): x.get("template") for x in t if isinstance(x.get("template"), str)}
    t = named.get("default")
  if t is not None and not isinstance(t, str):
    raise InputError(f"{file}: chat_template must be a string (a Jinja template) or a list of "
                     f"named templates with a 'default' one, got {describe_value(t)[:80]}")
  return t, named


def _raise_exception(message):
  import jinja2
  raise jinja2.TemplateError(message)


def _special_tokens_of(cfg, file: str = "tokenizer config") -> dict[str, str]:
  """Every `*_token` entry of a parsed `tokenizer_config.json` / `special_tokens_map.json`
  (`bos_token`, `eos_token`, model-specific ones such as `eot_token`): strings, or Hugging
  Face's {"content": ...} objects; others are left out."""
  if not isinstance(cfg, dict):
    raise InputError(f"{file} must hold a JSON object, got {describe_value(cfg)[:80]}")
  out = {}
  for name, v in cfg.items():
    if not name.endswith("_token"):
      continue
    if isinstance(v, dict):
      v = v.get("content")
    if isinstance(v, str):
      out[name] = v
  return out


def _normalise_message(m: dict) -> dict:
  """As transformers: keys holding None are dropped (OpenAI replies carry `tool_calls: None`),
  and a `reasoning` / `thinking` text is also `reasoning_content` (and `thinking`)."""
  m = {k: v for k, v in m.items() if v is not None}
  thought = next((m[k] for k in ("reasoning_content", "reasoning", "thinking") if k in m), None)
  if thought is not None:
    m.setdefault("reasoning_content", thought)
    m.setdefault("thinking", thought)
  return m


def _check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} "
                     "objects")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise InputError(f"messages[{i}] must be an object with a string 'role', got "
                       f"{describe_value(m)[:80]}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  import datetime
  return datetime.datetime.now().strftime(fmt)


def chat_environment():
  """The Jinja environment chat templates run in (Hugging Face's: sandboxed, immutable)."""
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env
