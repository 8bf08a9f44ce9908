"""Every bad input to `python -m llada_jax.decode` is one line on stderr and exit status 2, before
any work where it can be known then; the checkpoint directory is never changed. Plus the error
boundary (`llada_jax.errors.run_main`: bugs keep their traceback, --debug, Ctrl-C) and the
validation messages of `DecodeSettings` and `ModelConfig`."""

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llada_jax
from llada_jax.config import ModelConfig, tiny_config
from llada_jax.decode.__main__ import DEFAULT_CHECKPOINT, main
from llada_jax.decode.settings import DecodeSettings
from llada_jax.errors import InputError, describe, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "llada2_tiny")
WEIGHTS = "model.safetensors"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


# ---- building bad checkpoints -------------------------------------------------------------------
def _edit_config(**changes):
  def edit(d):
    with open(d / "config.json") as f:
      c = json.load(f)
    for k, v in changes.items():
      if v is _DELETE:
        c.pop(k, None)
      else:
        c[k] = v
    (d / "config.json").write_text(json.dumps(c))
  return edit


_DELETE = object()


def _write(name, data):
  def edit(d):
    if isinstance(data, bytes):
      (d / name).write_bytes(data)
    else:
      (d / name).write_text(data)
  return edit


def _truncate_weights(d):
  data = (d / WEIGHTS).read_bytes()
  (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _remove(name):
  def edit(d):
    p = d / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  return edit


def _config_is_a_directory(d):
  (d / "config.json").unlink()
  (d / "config.json").mkdir()


def _with_tokenizer(d):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(DEFAULT_CHECKPOINT, name), d / name)


def _tokenizer_then(*edits):
  def edit(d):
    _with_tokenizer(d)
    for e in edits:
      e(d)
  return edit


def _poison_weights(value, count=3):
  def edit(d):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(d / WEIGHTS))
    tensors[EXPERT].reshape(-1)[:count] = value
    save_file(tensors, str(d / WEIGHTS))
  return edit


def _shard_index(weight_map):
  def edit(d):
    (d / WEIGHTS).unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(weight_map))
  return edit


def _snapshot(d) -> dict:
  out = {}
  for root, dirs, files in os.walk(d):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      digest = None
      if os.path.isfile(p):
        with open(p, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
  return out


# ---- the table ----------------------------------------------------------------------------------
CKPT = "{ckpt}"
IDS = ["--prompt-ids", "1,2,3"]
TEXT = ["--prompt", "def f(x):"]

# (id, how the checkpoint copy is broken, flags after --checkpoint DIR, text the line must hold)
CASES = [
    # weights
    ("weights-truncated", _truncate_weights, IDS,
     "model.safetensors is not a readable safetensors"),
    ("weights-empty", _write(WEIGHTS, b""), IDS, "may be truncated or corrupt"),
    ("weights-random-bytes", _write(WEIGHTS, os.urandom(4096)), IDS,
     "is not a readable safetensors file"),
    ("weights-missing", _remove(WEIGHTS), IDS, "no weights in checkpoint"),
    ("weights-nan", _poison_weights(np.nan), IDS,
     f"non-finite weights in {CKPT}: {EXPERT} holds 3 NaN of 2048 values"),
    ("weights-inf-check-finite", _poison_weights(np.inf, 1), IDS + ["--check-finite"],
     f"{EXPERT} holds 1 inf of 2048"),
    ("weights-wrong-shape", _edit_config(intermediate_size=256), IDS,
     "does not match the config"),
    ("shard-index-not-json", _shard_index("x"), IDS, "invalid shard index"),
    ("shard-index-missing-shard", _shard_index({"weight_map": {"a": "nowhere.safetensors"}}), IDS,
     "missing shard file(s): nowhere.safetensors"),
    # config.json
    ("config-missing", _remove("config.json"), IDS, "no config.json at"),
    ("config-not-json", _write("config.json", "{not json"), IDS, "is not valid JSON"),
    ("config-binary", _write("config.json", b"\xff\xfe\x00garbage"), IDS, "is not UTF-8 text"),
    ("config-a-list", _write("config.json", "[1, 2]"), IDS, "must hold a JSON object"),
    ("config-is-a-directory", _config_is_a_directory, IDS, "Is a directory: "),
    ("config-string-int", _edit_config(max_position_embeddings="1024"), IDS,
     "max_position_embeddings must be a positive integer, got '1024' (a string; write 1024 "
     "without quotes)"),
    ("config-string-bool", _edit_config(use_qk_norm="false"), IDS,
     "use_qk_norm must be true or false, got 'false' (a string; write false without quotes)"),
    ("config-int-bool", _edit_config(tie_word_embeddings=0), IDS,
     "tie_word_embeddings must be true or false, got 0 (an integer)"),
    ("config-string-float", _edit_config(rope_theta="600000.0"), IDS,
     "rope_theta must be a positive number, got '600000.0' (a string"),
    ("config-float-int", _edit_config(hidden_size=64.0), IDS,
     "hidden_size must be a positive integer, got 64.0 (a number)"),
    ("config-nan", _edit_config(rms_norm_eps=math.nan), IDS,
     "rms_norm_eps must be a positive number, got nan (not a number)"),
    ("config-negative", _edit_config(num_shared_experts=-1), IDS,
     "num_shared_experts must be a non-negative integer, got -1"),
    ("config-null-required", _edit_config(vocab_size=None), IDS,
     "vocab_size must be a positive integer, got None (null)"),
    ("config-missing-required", _edit_config(num_experts=_DELETE), IDS,
     "missing required key(s) num_experts"),
    ("config-missing-mask-id", _edit_config(mask_token_id=_DELETE), IDS,
     "mask_token_id is missing: it has a default (156895) only with the LLaDA2 vocabulary"),
    ("config-string-token-id", _edit_config(eos_token_id="510"), IDS,
     "eos_token_id must be a token id (an integer in [0, vocab_size)), got '510'"),
    ("config-bad-torch-dtype", _edit_config(torch_dtype=["float32"]), IDS,
     "unsupported torch_dtype ['float32']"),
    # tokenizer and chat template
    ("tokenizer-json-broken", _tokenizer_then(_write("tokenizer.json", '{"model": 3')), TEXT,
     "tokenizer.json is not a valid tokenizer.json"),
    ("tokenizer-json-random", _tokenizer_then(_write("tokenizer.json", os.urandom(512))), TEXT,
     "tokenizer.json is not a valid tokenizer.json"),
    ("tokenizer-config-not-json", _tokenizer_then(_write("tokenizer_config.json", "{")), TEXT,
     "tokenizer_config.json is not valid JSON"),
    ("chat-template-syntax-error", _tokenizer_then(_write(
        "tokenizer_config.json", json.dumps({"chat_template": "{% for m in messages %}{{ m"}))),
     TEXT, "tokenizer_config.json: chat template syntax error at line 1"),
    ("chat-template-jinja-file", _tokenizer_then(
        _write("tokenizer_config.json", "{}"),
        _write("chat_template.jinja", "line one\n{% if x %}{% endfor %}")), TEXT,
     "chat_template.jinja: chat template syntax error at line 2"),
    ("chat-template-not-a-string", _tokenizer_then(
        _write("tokenizer_config.json", json.dumps({"chat_template": 7}))), TEXT,
     "chat_template must be a string"),
    ("chat-template-raises", _tokenizer_then(_write("tokenizer_config.json", json.dumps(
        {"chat_template": "{{ raise_exception('roles must alternate') }}"}))), TEXT,
     "the chat template failed to render (TemplateError: roles must alternate)"),
    ("prompt-without-tokenizer", None, TEXT, "--prompt needs a tokenizer.json"),
    # decode settings
    ("threshold-negative", None, IDS + ["--threshold", "-0.5"],
     "threshold -0.5 (a number) is not a probability: thresholds are probabilities in [0, 1]"),
    ("threshold-above-one", None, IDS + ["--threshold", "1.5"], "threshold 1.5 (a number) is not"),
    ("threshold-percent", None, IDS + ["--threshold", "95"],
     "thresholds are probabilities in [0, 1] (1 = never); 95 looks like a percentage, use 0.95"),
    ("threshold-nan", None, IDS + ["--threshold", "nan"], "threshold nan (not a number) is not"),
    ("editing-threshold-above-one", None, IDS + ["--editing-threshold", "1.5"],
     "editing_threshold 1.5 (a number) is not a probability"),
    ("editing-threshold-percent", None, IDS + ["--editing-threshold", "50"],
     "50 looks like a percentage, use 0.5"),
    ("temperature-nan", None, IDS + ["--temperature", "nan"],
     "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("temperature-negative", None, IDS + ["--temperature", "-1"], "got -1.0 (a number)"),
    ("temperature-inf", None, IDS + ["--temperature", "inf"], "got inf (infinite)"),
    ("top-k-above-vocab", None, IDS + ["--top-k", "1000"],
     "top_k (1000) exceeds the vocabulary size (512)"),
    ("top-k-negative", None, IDS + ["--top-k", "-1"],
     "top_k must be a non-negative integer (0 = off), got -1"),
    ("top-p-zero", None, IDS + ["--top-p", "0"], "top_p must be in (0, 1] (1 = off), got 0.0"),
    ("top-p-above-one", None, IDS + ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("top-p-nan", None, IDS + ["--top-p", "nan"], "top_p must be in (0, 1]"),
    ("num-to-transfer-above-block", None,
     IDS + ["--num-to-transfer", "9", "--block-length", "8"],
     "num_to_transfer (9) must be at most block_length (8)"),
    ("gen-length-zero", None, IDS + ["--gen-length", "0"],
     "gen_length must be a positive integer, got 0"),
    ("gen-length-negative", None, IDS + ["--gen-length", "-5"], "gen_length must be a positive"),
    ("block-length-zero", None, IDS + ["--block-length", "0"], "block_length must be a positive"),
    ("steps-zero", None, IDS + ["--steps", "0"], "steps must be a positive integer"),
    ("num-to-transfer-zero", None, IDS + ["--num-to-transfer", "0"], "num_to_transfer must be"),
    ("max-post-steps-negative", None, IDS + ["--max-post-steps", "-1"],
     "max_post_steps must be a non-negative integer"),
    ("mbe-window-zero", None, IDS + ["--mbe-window", "0"], "mbe_window must be a positive"),
    ("mask-id-outside-vocab", None, IDS + ["--mask-id", "600"],
     "mask_id 600 is not a token id of a vocabulary of 512"),
    ("eos-equals-mask", None, IDS + ["--eos-id", "511"], "eos_id and mask_id must differ"),
    ("prompt-id-outside-vocab", None, ["--prompt-ids", "1,600"], "token id outside [0, 512)"),
    ("prompt-too-long", None, IDS + ["--gen-length", "600"], "exceeds the model context of 512"),
    ("unknown-mode", None, IDS + ["--mode", "turbo"], "unknown mode 'turbo'"),
    ("unknown-attention-impl", None, IDS + ["--attention-impl", "cuda"],
     "unknown attention_impl 'cuda'"),
    ("unknown-moe-impl", None, IDS + ["--moe-impl", "magic"], "unknown --moe-impl 'magic'"),
    ("unknown-update-impl", None, IDS + ["--update-impl", "magic"], "unknown update_impl 'magic'"),
    ("bad-mesh", None, IDS + ["--mesh", "bogus"], "invalid mesh spec 'bogus'"),
    ("bad-int-flag", None, IDS + ["--top-k", "ten"], "argument --top-k: invalid int value"),
]


@pytest.fixture
def ckpt(tmp_path):
  d = tmp_path / "ckpt"
  shutil.copytree(TINY, d, ignore=shutil.ignore_patterns("golden*", "README.md"))
  return d


def _one_error_line(err: str) -> str:
  assert err.endswith("\n") and err.count("\n") == 1, repr(err)
  assert err.startswith("error: "), err
  assert "Traceback" not in err and "File \"" not in err, err
  return err[len("error: "):-1]


@pytest.mark.parametrize("break_it, flags, expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(ckpt, capsys, break_it, flags, expected):
  if break_it is not None:
    break_it(ckpt)
  before = _snapshot(ckpt)
  status = main(["--checkpoint", str(ckpt)] + flags)
  out, err = capsys.readouterr()
  assert status == 2, (out, err)
  line = _one_error_line(err)
  assert expected.replace(CKPT, str(ckpt)) in line, line
  assert out == ""
  assert _snapshot(ckpt) == before  # nothing written into the checkpoint


@pytest.mark.parametrize("where", ["/no/such/dir", "relative/typo/x", "owner/name..x"])
def test_missing_checkpoint_directory(where, capsys):
  assert main(["--checkpoint", where] + IDS) == 2
  assert f"no such checkpoint directory: {where}" in _one_error_line(capsys.readouterr().err)


def test_checkpoint_is_a_file(ckpt, capsys):
  assert main(["--checkpoint", str(ckpt / WEIGHTS)] + IDS) == 2
  assert "no such checkpoint directory" in _one_error_line(capsys.readouterr().err)


def test_nan_weights_decode_with_no_check_finite(ckpt, capsys):
  """The check can be switched off (it is on by default for this small checkpoint)."""
  _poison_weights(np.nan)(ckpt)
  argv = ["--checkpoint", str(ckpt), "--gen-length", "8", "--block-length", "8",
          "--format", "json"] + IDS
  assert main(argv + ["--no-check-finite"]) == 0
  assert len(json.loads(capsys.readouterr().out)["output_ids"]) == 8


# ---- the error boundary -------------------------------------------------------------------------
def test_debug_flag_and_env_show_the_traceback(ckpt, capsys, monkeypatch):
  _edit_config(use_qk_norm="false")(ckpt)
  argv = ["--checkpoint", str(ckpt)] + IDS
  assert main(argv + ["--debug"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("\n") and err.splitlines()[-1].startswith(
      "error: invalid model config")
  monkeypatch.setenv("LLADA_JAX_DEBUG", "1")
  assert main(argv) == 2
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv("LLADA_JAX_DEBUG", "0")
  assert main(argv) == 2
  _one_error_line(capsys.readouterr().err)


def test_bugs_keep_their_traceback(monkeypatch):
  """An unknown exception is not turned into one line: it propagates (Python prints it)."""
  def broken(*a, **k):
    return 1 / 0
  monkeypatch.setattr(llada_jax, "generate", broken)
  with pytest.raises(ZeroDivisionError):
    main(["--checkpoint", TINY, "--gen-length", "8", "--block-length", "8"] + IDS)


@pytest.mark.parametrize("exc, expected", [
    (InputError("bad flag\nsecond line"), "error: bad flag second line"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.npy"),
     "error: No space left on device: /out/x.npy"),
    (PermissionError(errno.EACCES, "Permission denied", "/ckpt/config.json"),
     "error: Permission denied: /ckpt/config.json"),
    (FileNotFoundError("no config.json at /x"), "error: no config.json at /x"),
    (json.JSONDecodeError("Expecting value", "{", 1),
     "error: invalid JSON: Expecting value: line 1 column 2 (char 1)"),
])
def test_run_main_known_failures(exc, expected, capsys):
  def fn(argv):
    raise exc
  assert run_main(fn, []) == 2
  assert capsys.readouterr().err == expected + "\n"


def test_run_main_value_errors_from_libraries_are_bugs(capsys):
  """A ValueError raised by llada_jax code is a deliberate message; one from numpy (or jax) deep
  inside a computation is a bug, and keeps its traceback."""
  def ours(argv):
    from llada_jax.config import get_preset
    return get_preset("gpt")
  assert run_main(ours, []) == 2
  assert capsys.readouterr().err.startswith("error: unknown model preset 'gpt'; choose from")

  def numpy_bug(argv):
    return np.zeros(6).reshape(4, 4)
  with pytest.raises(ValueError, match="reshape"):
    run_main(numpy_bug, [])
  e = ValueError("raised outside any frame")
  assert describe(e) is None


def test_run_main_exit_status_passes_through():
  assert run_main(lambda argv: 0, []) == 0
  assert run_main(lambda argv: 3, []) == 3


def test_keyboard_interrupt_is_one_line_and_keeps_the_stream(capsys, monkeypatch):
  """Ctrl-C during a --stream decode: "interrupted", status 130, streamed blocks stay."""
  def interrupted(params, config, prompts, on_block=None, **kw):
    on_block(np.array([True]), np.array([0]), np.arange(16)[None], np.array([3]))
    raise KeyboardInterrupt
  monkeypatch.setattr(llada_jax, "generate", interrupted)
  status = main(["--checkpoint", TINY, "--stream", "--gen-length", "8", "--block-length", "8"]
                + IDS)
  out, err = capsys.readouterr()
  assert status == 130 and err == "interrupted\n"
  assert out == "[row 0 block 0] 3 4 5 6 7\n"


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="needs Python's default SIGINT handler in this process")
def test_soft_interrupt_raises_and_a_swallowed_one_still_ends_130(capsys):
  """`run_main(hard_interrupt=False)` (for commands with cleanup, e.g. a trainer later): Ctrl-C
  raises KeyboardInterrupt in the main thread; one swallowed by a library still gives 130."""
  def interrupted(argv):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    return 0
  assert run_main(interrupted, [], hard_interrupt=False) == 130

  def swallowed(argv):
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
    except KeyboardInterrupt:
      pass
    return 0
  assert run_main(swallowed, [], hard_interrupt=False) == 130
  assert capsys.readouterr().err == "interrupted\ninterrupted\n"
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


_SIGINT_DRIVER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not a background job)
import llada_jax
from llada_jax.decode.__main__ import main

real = llada_jax.generate
def generate(*args, on_block=None, **kw):
  def first_block_then_ctrl_c(*a):
    on_block(*a)
    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the compiled loop is still running
    time.sleep(120)
  return real(*args, on_block=first_block_then_ctrl_c, **kw)
llada_jax.generate = generate
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_mid_decode_exits_at_once(tmp_path):
  """A real SIGINT while the compiled decode loop runs (inside a streaming host callback, where
  the main thread waits in JAX and Python's own handler would only run at the end): the process
  ends at once with status 130 and one line; the block already streamed stays on stdout."""
  driver = tmp_path / "driver.py"
  driver.write_text(_SIGINT_DRIVER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(
      ROOT, ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  t0 = time.monotonic()
  p = subprocess.run(
      [sys.executable, str(driver), "--checkpoint", TINY, "--stream", "--gen-length", "16",
       "--block-length", "8"] + IDS, capture_output=True, text=True, env=env, cwd=ROOT,
      timeout=300)
  assert p.returncode == 130, p.stderr[-3000:]
  assert p.stderr == "interrupted\n"
  assert p.stdout.startswith("[row 0 block 0]") and p.stdout.count("\n") == 1, p.stdout
  assert time.monotonic() - t0 < 110  # not after the callback's 120 s sleep


# ---- validation messages ------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, msg", [
    (dict(threshold=95), "threshold 95 (an integer) is not a probability: thresholds are "
     "probabilities in [0, 1] (1 = never); 95 looks like a percentage, use 0.95"),
    (dict(threshold=-0.5), "threshold -0.5 (a number) is not a probability"),
    (dict(threshold=1.5), "threshold 1.5 (a number) is not a probability"),
    (dict(editing_threshold=math.nan), "editing_threshold nan (not a number)"),
    (dict(threshold="0.9"), "threshold '0.9' (a string) is not a probability"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=math.nan), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k must be a non-negative integer"),
    (dict(top_k=True), "top_k must be a non-negative integer (0 = off), got True (a boolean)"),
    (dict(num_to_transfer=33), "num_to_transfer (33) must be at most block_length (32)"),
    (dict(gen_length=0), "gen_length must be a positive integer, got 0"),
    (dict(gen_length=8.0), "gen_length must be a positive integer, got 8.0 (a number)"),
    (dict(block_length=-8), "block_length must be a positive integer"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(max_post_steps=-1), "max_post_steps must be a non-negative integer"),
    (dict(mbe_window=0), "mbe_window must be a positive integer"),
    (dict(seed=1.5), "seed must be a 64-bit integer, got 1.5"),
    (dict(eos_early_stop="no"), "eos_early_stop must be true or false, got 'no' (a string)"),
    (dict(mask_id=-7), "mask_id must be a token id (or -1: from the model config)"),
    (dict(algorithm="llada3"), "algorithm 'llada3'"),
])
def test_decode_settings_messages(overrides, msg):
  with pytest.raises(InputError) as e:
    DecodeSettings.for_mode("quality", **overrides)
  assert str(e.value).startswith("invalid decode setting: ") and msg in str(e.value)
  assert "\n" not in str(e.value)


def test_decode_settings_vocabulary_checks_and_accepted_edges():
  s = DecodeSettings.for_mode("quality", top_k=600).with_ids(510, 511)
  with pytest.raises(InputError, match=r"top_k \(600\) exceeds the vocabulary size \(512\)"):
    s.validate(512)
  s.validate(1024)
  # Edges that mean something: never fill/edit by threshold (1, and the reference's 1.01),
  # fill/edit anything (0), top_k = vocab, max_post_steps 0, num_to_transfer = block_length.
  for kw in (dict(threshold=1.0, editing_threshold=1.01), dict(threshold=0.0,
             editing_threshold=0.0), dict(top_k=512, max_post_steps=0, num_to_transfer=32)):
    DecodeSettings.for_mode("speedy", **kw).with_ids(510, 511).validate(512)


@pytest.mark.parametrize("change, msg", [
    (dict(max_position_embeddings="1024"), "max_position_embeddings must be a positive integer, "
     "got '1024' (a string; write 1024 without quotes)"),
    (dict(use_qk_norm="false"), "use_qk_norm must be true or false, got 'false' (a string; "
     "write false without quotes)"),
    (dict(use_qk_norm="maybe"), "use_qk_norm must be true or false, got 'maybe' (a string)"),
    (dict(num_attention_heads="4"), "num_attention_heads must be a positive integer, got '4'"),
    (dict(num_key_value_heads=-1), "num_key_value_heads must be a positive integer (or 0: as "
     "many as num_attention_heads), got -1"),
    (dict(partial_rotary_factor=math.nan), "partial_rotary_factor must be a number in (0, 1], "
     "got nan (not a number)"),
    (dict(routed_scaling_factor=True), "routed_scaling_factor must be a positive number, got "
     "True (a boolean)"),
    (dict(rope_theta=math.inf), "rope_theta must be a positive number, got inf (infinite)"),
    (dict(first_k_dense_replace=[1]), "first_k_dense_replace must be a non-negative integer, "
     "got [1] (a list)"),
    (dict(eos_token_id=[]), "eos_token_id must be a token id (an integer in [0, vocab_size)) or "
     "a non-empty list of them, got []"),
    (dict(mask_token_id=600), "mask_token_id (600) must be a token id in [0, vocab_size=512)"),
    (dict(torch_dtype={"a": 1}), "unsupported torch_dtype {'a': 1}"),
])
def test_model_config_messages(change, msg):
  d = tiny_config().to_hf()
  d.update(change)
  with pytest.raises(InputError) as e:
    ModelConfig.from_hf(d)
  assert msg in str(e.value) and str(e.value).startswith("invalid model config: ")


def test_model_config_constructor_checks_types_first():
  """Direct construction (Python API) gets the same one line, not a TypeError from arithmetic
  on a string."""
  with pytest.raises(InputError, match="num_attention_heads must be a positive integer, got "
                     "'4' \\(a string"):
    tiny_config(num_attention_heads="4")
  with pytest.raises(InputError, match="use_bias must be true or false"):
    tiny_config(use_bias=None)
  assert tiny_config(max_position_embeddings=np.int64(64)).max_position_embeddings == 64


def test_missing_token_ids_default_only_with_the_llada2_vocabulary():
  d = tiny_config().to_hf()
  del d["mask_token_id"]
  with pytest.raises(InputError, match='mask_token_id is missing.*add "mask_token_id": <token '
                     'id> to config.json'):
    ModelConfig.from_hf(d)
  d = ModelConfig.from_hf(tiny_config().to_hf()).to_hf()
  d.update(vocab_size=157184)
  for k in ("pad_token_id", "eos_token_id", "mask_token_id"):
    del d[k]
  c = ModelConfig.from_hf(d)
  assert (c.pad_token_id, c.eos_token_id, c.mask_token_id) == (156892, 156892, 156895)


def test_config_file_errors_name_the_file(tmp_path):
  d = tiny_config().to_hf()
  d["use_qk_norm"] = "false"
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(InputError) as e:
    ModelConfig.from_json_file(tmp_path)
  assert str(e.value).startswith(f"invalid model config {tmp_path / 'config.json'}: use_qk_norm")


# ---- the train CLI: every bad config, flag or data file is one line, exit 2, before compiling --
TRAIN_CFG = os.path.join(ROOT, "configs", "tiny_pretrain.py")
DATA_FILES = {
    "ok.txt": "hello world\nsecond line\n",
    "bad.jsonl": '{"text": "abc"}\n{"text": 5\n',
    "empty.jsonl": "",
    "notext.jsonl": '{"txt": "abc"}\n',
    "broken_cfg.py": "x = (\n",
    "nameerr_cfg.py": "def get_config():\n  return foo\n",
}
OK = "--config.data.source={d}/ok.txt"
TRAIN_CASES = [
    # (id, argv after --workdir, expected fragment of the one line)
    ("batch_size=0", [OK, "--config.data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    ("seq_len<0", [OK, "--config.data.seq_len=-5"], "data.seq_len=-5 must be >= 1"),
    ("log_every=0", [OK, "--config.log_every=0"], "log_every=0 must be >= 1"),
    ("ckpt_every=0", [OK, "--config.ckpt_every=0"], "ckpt_every=0 must be >= 1"),
    ("lr<0", [OK, "--config.optim.lr=-1"], "optim.lr=-1.0 must be >= 0"),
    ("b2 as percent", [OK, "--config.optim.b2=95"], "not a percentage"),
    ("steps=0", [OK, "--config.steps=0"], "steps=0 must be >= 1"),
    ("unknown key", [OK, "--config.seq_len=5"], "--config.seq_len: no such key"),
    ("typo key", [OK, "--config.data.sourc=x"], 'Did you mean "source"'),
    ("not an int", [OK, "--config.data.batch_size=x"], "--config.data.batch_size=x"),
    ("unknown flag", [OK, "--bogus"], "Unknown command line flag 'bogus'"),
    ("bad mesh", [OK, "--config.mesh=fsdp=x"], "fsdp"),
    ("bad stage", [OK, "--config.stage=pretrain"], "stage 'pretrain'"),
    ("missing source", ["--config.data.source={d}/missing.txt"], "does not exist"),
    ("invalid jsonl", ["--config.data.source={d}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    ("empty jsonl", ["--config.data.source={d}/empty.jsonl"], "empty corpus"),
    ("record without text", ["--config.data.source={d}/notext.jsonl"], 'needs "text"'),
]


@pytest.fixture
def data_dir(tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  for name, text in DATA_FILES.items():
    (d / name).write_text(text)
  return d


def _train(argv):
  from llada_jax.train.__main__ import main as train_main  # noqa: PLC0415
  return train_main(argv)


@pytest.mark.parametrize("extra, expected", [c[1:] for c in TRAIN_CASES],
                         ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_is_one_line_and_exit_2(tmp_path, data_dir, capsys, extra, expected):
  workdir = tmp_path / "run"
  argv = ["--config", TRAIN_CFG, "--workdir", str(workdir), "--no_progress"]
  status = _train(argv + [a.format(d=data_dir) for a in extra])
  out, err = capsys.readouterr()
  assert status == 2, (out, err)
  assert expected in _one_error_line(err), err
  assert not workdir.exists()  # a bad input leaves no run directory behind


@pytest.mark.parametrize("config, expected", [
    ("missing.py", "--config: [Errno 2] No such file or directory"),
    ("broken_cfg.py", "broken_cfg.py:1: '(' was never closed"),
    ("nameerr_cfg.py", "NameError: name 'foo' is not defined"),
])
def test_train_bad_config_file(tmp_path, data_dir, capsys, config, expected):
  assert _train(["--config", str(data_dir / config), "--workdir", str(tmp_path / "w")]) == 2
  assert expected in _one_error_line(capsys.readouterr().err)


def test_train_needs_config_and_workdir(capsys):
  assert _train(["--config", TRAIN_CFG]) == 2
  assert "--config FILE and --workdir DIR are required" in _one_error_line(
      capsys.readouterr().err)


def test_train_help_lists_the_flags(capsys):
  assert _train(["--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--config:", "--workdir:", "--export_hf:", "--force:", "--config.KEY=VALUE"):
    assert flag in out, out


def test_train_existing_workdir_is_kept_on_bad_input(tmp_path, data_dir, capsys):
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  assert _train(["--config", TRAIN_CFG, "--workdir", str(workdir),
                 f"--config.data.source={data_dir}/empty.jsonl"]) == 2
  assert (workdir / "notes.txt").read_text() == "keep me"
  _one_error_line(capsys.readouterr().err)


# ---- tools: the same boundary (`run_main`), checked as a user runs them --------------------------
@pytest.mark.parametrize("argv, expected", [
    (["tools/logits.py", "--checkpoint", "/no/such", "--input-ids", "1", "--out", "x.npy"],
     "no such checkpoint directory: /no/such"),
    (["tools/plan_memory.py", "--train-config", "missing.py"], "no training config file"),
    (["tools/plan_memory.py", "--train-config", TRAIN_CFG, "--set", "nokey=1"],
     "--set nokey: no such key"),
    (["tools/export_tpu.py", "--config", "nope", "--mesh", "data=2"], "unknown model preset"),
], ids=["logits", "plan_memory", "plan_memory_set", "export_tpu"])
def test_tools_report_bad_input_in_one_line(argv, expected, tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert expected in _one_error_line(out.stderr), out.stderr
