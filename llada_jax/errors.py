"""One error boundary for command-line entry points: a bad input is one line, a bug a traceback.

Validation raises `InputError` (a `ValueError`, so library callers can keep catching
`ValueError`) with a message that names the field, the value and what is allowed. An entry point
wraps its body with `run_main`:

    def main(argv=None) -> int:
      return run_main(run, argv)

and gets, for every entry point alike:

- a known failure (`InputError`; a `ValueError` raised by llada_jax code itself; `OSError`s such
  as a missing path, a permission error or a full disk; an unreadable JSON, safetensors or Jinja
  file; device memory exhausted) prints `error: <one line>` to stderr and exits with status 2;
- Ctrl-C prints `interrupted` and exits with status 130 (what was already printed stays), also
  in the middle of a compiled computation (see `run_main`);
- anything else is a bug: its traceback is shown as Python shows it (status 1), never swallowed;
- `--debug` in argv, or `LLADA_JAX_DEBUG=1` in the environment, also prints the traceback of
  known failures and interrupts (the exit status stays 2 / 130).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Sequence

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "LLADA_JAX_DEBUG"
DEBUG_FLAG = "--debug"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class InputError(ValueError):
  """A bad input (a flag, a file, a setting, a config field). The message is the whole report:
  one line naming what is wrong, the value and what is allowed."""


def one_line(text) -> str:
  """`text` with every run of whitespace (newlines included) collapsed to one space."""
  return " ".join(str(text).split())


def describe_value(v) -> str:
  """`'1024' (a string)`-style description of a bad value, for validation messages."""
  kinds = {str: "a string", bool: "a boolean", float: "a number", int: "an integer",
           list: "a list", dict: "an object", type(None): "null"}
  kind = kinds.get(type(v), f"a {type(v).__name__}")
  if isinstance(v, float) and not math.isfinite(v):
    kind = "not a number" if math.isnan(v) else "infinite"
  return f"{v!r} ({kind})"


def _raised_in_package(e: BaseException) -> bool:
  """Whether the innermost frame of `e`'s traceback is llada_jax code (a deliberate `raise`),
  rather than a library (jax, numpy, ...) where a `ValueError` usually means a bug of ours."""
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def _os_error(e: OSError) -> str:
  if e.strerror and e.filename is not None:
    msg = f"{e.strerror}: {e.filename}"
    if e.filename2 is not None:
      msg += f" -> {e.filename2}"
    return msg
  return str(e) or type(e).__name__


def describe(e: BaseException) -> str | None:
  """The one-line report of a known failure, or None when `e` looks like a bug."""
  if isinstance(e, InputError):
    return one_line(e)
  if isinstance(e, OSError):
    return one_line(_os_error(e))
  if isinstance(e, json.JSONDecodeError):
    return one_line(f"invalid JSON: {e}")
  if isinstance(e, UnicodeDecodeError):
    return one_line(f"a text file holds bytes that are not UTF-8 ({e.reason} at byte {e.start})")
  name, module = type(e).__name__, type(e).__module__ or ""
  if name == "SafetensorError":
    return one_line(f"unreadable safetensors file: {e}")
  if module.startswith("jinja2") and name.startswith("Template"):
    return one_line(f"chat template: {e}")
  if name in ("XlaRuntimeError", "JaxRuntimeError"):
    first = str(e).strip().split("\n")[0]
    if "RESOURCE_EXHAUSTED" in first:
      return one_line(f"out of device memory: {first}")
    return None
  if isinstance(e, ValueError) and _raised_in_package(e):
    return one_line(e)
  return None


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def run_main(fn: Callable[[list[str] | None], int], argv: Sequence[str] | None = None, *,
             hard_interrupt: bool = True) -> int:
  """Runs `fn(argv)` inside the error boundary (see the module docstring); returns the status.

  Known failures and Ctrl-C become one line on stderr (status 2 / 130); unknown exceptions
  propagate with their traceback. `argv=None` means `sys.argv[1:]` (also for `--debug`).

  Ctrl-C: while a compiled program runs, Python's handler may only run once the program ends
  (the main thread waits inside JAX; with host callbacks, e.g. streaming, for the whole run), and
  JAX can swallow the `KeyboardInterrupt` it raises (jax-ml/jax#18246). With `hard_interrupt`
  (for commands whose output is only what they print) Ctrl-C flushes stdout, prints
  "interrupted" and ends the process at once with status 130, even mid-computation: a watcher
  thread wakes on the signal through `signal.set_wakeup_fd`, not needing the main thread.
  Without it, the first Ctrl-C raises `KeyboardInterrupt` (so `finally` blocks run; if it is
  swallowed, the run still ends with "interrupted" and 130) and a second one ends the process.
  """
  debug = debug_requested(argv)
  interrupted = []

  def on_sigint(signum, frame):
    if hard_interrupt or interrupted:
      if debug:
        traceback.print_stack(frame)
      _exit_interrupted()
    interrupted.append(True)
    raise KeyboardInterrupt

  previous = _install_sigint(on_sigint)
  watcher = _SigintWatcher(debug) if hard_interrupt and previous is not None else None
  try:
    status = fn(None if argv is None else list(argv))
    if interrupted:
      raise KeyboardInterrupt
    return status
  except KeyboardInterrupt:
    if debug:
      traceback.print_exc()
    _flush_stdout()
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # noqa: BLE001 (re-raised below unless it is a known failure)
    msg = describe(e)
    if msg is None:
      raise
    if debug:
      traceback.print_exc()
    _flush_stdout()
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_INPUT
  finally:
    if watcher is not None:
      watcher.stop()
    if previous is not None:
      signal.signal(signal.SIGINT, previous)


def _install_sigint(handler):
  """Installs `handler` for SIGINT when Python's default one is in place (and this is the main
  thread); returns the handler to restore, or None when nothing was installed."""
  if threading.current_thread() is not threading.main_thread():
    return None
  previous = signal.getsignal(signal.SIGINT)
  if previous is not signal.default_int_handler:
    return None  # someone (a test runner, an embedding program) handles Ctrl-C already
  signal.signal(signal.SIGINT, handler)
  return previous


class _SigintWatcher:
  """A daemon thread that ends the process on SIGINT as soon as the signal arrives: Python's C
  signal handler writes the signal number to the wakeup fd whatever the main thread is doing."""

  def __init__(self, debug: bool):
    self._debug = debug
    self._read, self._write = os.pipe()
    os.set_blocking(self._write, False)
    self._stopped = False
    try:
      self._old = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread after all
      self._old = None
    if self._old is not None and self._old != -1:  # another wakeup fd in use: leave it be
      signal.set_wakeup_fd(self._old)
      self._old = None
    if self._old is None:
      self._close()
      self._stopped = True
      return
    self._thread = threading.Thread(target=self._watch, name="sigint-watcher", daemon=True)
    self._thread.start()

  def _watch(self) -> None:
    while True:
      try:
        data = os.read(self._read, 64)
      except OSError:
        return
      if self._stopped or not data:
        return
      if signal.SIGINT in data:
        if self._debug:
          import faulthandler  # noqa: PLC0415
          faulthandler.dump_traceback(all_threads=True)
        _exit_interrupted()

  def stop(self) -> None:
    if self._stopped:
      return
    self._stopped = True
    signal.set_wakeup_fd(self._old)
    try:
      os.write(self._write, b"\0")  # wakes the thread, which sees _stopped and returns
    except OSError:
      pass
    self._thread.join(timeout=5)
    self._close()

  def _close(self) -> None:
    for fd in (self._read, self._write):
      try:
        os.close(fd)
      except OSError:
        pass


def _exit_interrupted() -> None:
  _flush_stdout()
  try:
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
  finally:
    os._exit(EXIT_INTERRUPTED)


def _flush_stdout() -> None:
  try:
    sys.stdout.flush()
  except (OSError, ValueError):  # closed pipe or closed stream: nothing more to keep
    pass
