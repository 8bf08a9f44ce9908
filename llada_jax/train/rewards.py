"""Verifiable rewards for EBPO on prompt sets: `fn(response, record) -> float` in [0, 1].

`record` is the prompt set's JSONL record (`llada_jax.train.prompt_sets`); `REQUIRED_FIELDS`
names the field each reward reads. A reward never raises on a response: a bad one scores 0.0.
  * `exact_match`: 1.0 when the response equals `answer`, surrounding whitespace stripped.
  * `math`: the final answer (the content of the last `\\boxed{...}`, else the last number) equal
    to `answer` (itself possibly boxed, or after a GSM8K-style `####`) after normalisation
    (`normalize_answer`); numbers compare by value (`3/4`, `\\frac{3}{4}`, `0.75`, `.75` are one).
  * `code`: the fraction of the record's `tests` (Python source, or a list of sources, e.g.
    `assert f(2) == 4`) that pass after the response's code (its last fenced block, else all of
    it) ran once, in one sandboxed subprocess (`run_tests`; it raises OSError only when the
    sandbox itself cannot start, so a broken environment stops the run rather than scoring 0).
  * `char_overlap`, `match_any`: the toy tasks' rewards (`llada_jax.train.toy_tasks`).

The code sandbox is a BEST-EFFORT guard for the reward of a model's own code during RL, against
accidents (a stray delete, an endless loop, a memory blow-up, a network call); it is NOT a
security boundary against code written to escape it: audit hooks can be got round by a
determined guest (the result lines' nonce, for one, sits in the child's memory) and the child
runs as the trainer's user. For untrusted code run the trainer in a container (or a VM).
  * The child is `sys.executable -I -S -B` (isolated: no PYTHON* variables, no site-packages,
    so the standard library only; no .pyc writes), in its own session, in a fresh
    `tempfile.TemporaryDirectory` (its cwd, TMPDIR and HOME; removed afterwards), with an
    environment of PATH, LANG, TMPDIR and HOME only.
  * Limits (soft = hard), set by the child itself before the code runs (a `preexec_fn` is
    unsafe in a multi-threaded trainer and rules out vfork): address space 1 GiB, CPU time
    timeout + 1 s, files written 10 MiB, no core files. RLIMIT_NPROC is left alone: it counts
    every process and thread of the user (the trainer's included) and does not bind root, so
    no "small" value is reliable; the audit hook refuses process creation instead.
  * A wall-clock `timeout` (`TIMEOUT_S`), after which the child's process group is killed.
  * An audit hook (`sys.addaudithook`: the guest cannot remove it), installed before the code
    runs, refuses with PermissionError:
      - files: opening for writing, appending or creating outside the temp directory
        (`/dev/null` excepted; paths resolved with symbolic links followed); opening a
        directory outside it (no descriptors for `dir_fd` tricks); remove, rename, mkdir, rmdir,
        chmod, chown, utime, truncate, xattr changes and `shutil.rmtree` outside it (descriptors
        of open files, as in `os.fchmod`, count as outside); symbolic and hard links;
        `os.chdir`;
      - network: socket connect, bind, sendto, sendmsg, getaddrinfo, gethostbyname/addr;
      - processes: `subprocess.Popen`, `os.system`, `os.exec*`, `os.posix_spawn*`, `os.spawn*`,
        `os.fork`, `os.forkpty`, `os.kill`, `os.killpg`, `signal.pthread_kill`, and
        `_posixsubprocess.fork_exec` (not audited: replaced by a refusal, and the module cannot
        be loaded afresh);
      - native code: ctypes (dlopen, dlsym, foreign calls; importing `_ctypes`), the `_testcapi`
        modules, new (sub)interpreters (they would not have the hook);
      - tampering: `resource.setrlimit`/`prlimit`, `sys.settrace`/`setprofile`,
        `gc.get_objects`/`get_referrers`/`get_referents`.
    Reading files is not restricted, but for descriptor links (`/proc/*/fd/N`, `/dev/fd/N`).
  * Results travel on their own pipe, a line per test with a random nonce, so what the code
    prints cannot forge or drown them; its stdout and stderr go to a file (at most 10 MiB)
    whose first `OUTPUT_CAP` bytes are `CodeRun.output`.
A solution that fails to load (syntax error, exception, exit, crash, timeout, memory or sandbox
error while it runs) scores 0.0; once it loaded, a test that raises, or that the process did not
live to finish (a crash or timeout), fails, and the others keep their credit.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fractions
import json
import math as _math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

from llada_jax.train import toy_tasks

Reward = Callable[[str, dict], float]

# ---------------------------------------------------------------------------------------------
# exact match


def _answer_of(record) -> str | None:
  """The record's reference answer as a string (JSON numbers included), or None."""
  value = record.get("answer") if isinstance(record, dict) else None
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    return None
  return str(value)


def exact_match(response: str, record: dict) -> float:
  """1.0 when the response is the record's answer, surrounding whitespace stripped."""
  answer = _answer_of(record)
  if answer is None or not isinstance(response, str):
    return 0.0
  return float(response.strip() == answer.strip())


# ---------------------------------------------------------------------------------------------
# math: final-answer extraction and normalisation

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# a number in running text: 12, -3.5, .5, 1,234, 3/4 (a minus sign right after a word, a
# bracket or a digit is an operator, as in `x-1` or `2-1`)
_NUMBER = re.compile(rf"(?:(?<![\w)\]}}])[-\u2212])?(?:{_DIGITS})(?:/(?:{_DIGITS}))?")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"(-?)\\frac(\d)(\d)")  # \frac12
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_SPACING = re.compile(r"\\[!,;: ]|\s+")  # \! \, \; \: "\ " and whitespace
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
REL_TOL = 1e-6  # numbers within this relative distance are equal (unless both are integers)


def _braced(text: str, start: int) -> str | None:
  """The text from `start` up to the brace closing an already open one, or None (unbalanced)."""
  depth = 1
  for m in _BRACE.finditer(text, start):
    depth += 1 if m.group() == "{" else -1
    if depth == 0:
      return text[start:m.start()]
  return None


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`) of `text`, nested braces kept;
  None without one (or when the last one is never closed, as in a truncated response)."""
  last = None
  for last in _BOXED.finditer(text):
    pass
  return None if last is None else _braced(text, last.end())


def last_number(text: str) -> str | None:
  """The last number of `text` (`-12`, `3.5`, `.5`, `1,234`, `3/4`) as written, or None."""
  last = None
  for last in _NUMBER.finditer(text):
    pass
  return None if last is None else last.group()


def final_answer(response: str) -> str | None:
  """A response's final answer: its last `\\boxed{}`'s content, else its last number."""
  boxed = last_boxed(response)
  return boxed if boxed is not None else last_number(response)


def reference_answer(answer: str) -> str:
  """The final answer of a reference: its last `\\boxed{}`'s content, else what follows its last
  `####` (GSM8K), else all of it."""
  boxed = last_boxed(answer)
  if boxed is not None:
    return boxed
  return answer.rpartition("####")[2] if "####" in answer else answer


def normalize_answer(text: str) -> str:
  """`text` without whitespace, `$`, `\\!` (and the other spacing commands), `\\left`/`\\right`,
  thousands commas and trailing periods; `\\dfrac`/`\\tfrac` become `\\frac`."""
  s = text.replace("$", "").replace("\u2212", "-")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _SPACING.sub("", _LEFT_RIGHT.sub("", s))
  return _THOUSANDS.sub("", s).rstrip(".")


def _plain(s: str) -> fractions.Fraction | None:
  """A plain decimal number (`-3`, `2.50`, `.5`) as an exact fraction, or None."""
  if not _PLAIN_NUMBER.fullmatch(s):
    return None
  try:
    return fractions.Fraction(s)
  except (ValueError, ZeroDivisionError):  # e.g. more digits than int() converts
    return None


def _ratio(num: str, den: str, negative: bool = False) -> fractions.Fraction | None:
  a, b = _plain(num), _plain(den)
  if a is None or not b:
    return None
  return -a / b if negative else a / b


def to_number(s: str) -> fractions.Fraction | None:
  """The value of a normalised answer that is a number (`-2`, `0.5`, `3/4`, `\\frac{3}{4}`,
  `-\\frac12`), exactly; None otherwise."""
  m = _FRAC.fullmatch(s) or _FRAC_SHORT.fullmatch(s)
  if m:
    return _ratio(m[2], m[3], negative=bool(m[1]))
  if s.count("/") == 1:
    return _ratio(*s.split("/"))
  return _plain(s)


def numbers_equal(a: fractions.Fraction, b: fractions.Fraction) -> bool:
  """Equal, or (unless both are integers) within `REL_TOL` of each other, relatively."""
  if a == b:
    return True
  if a.denominator == 1 and b.denominator == 1:
    return False
  return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def answers_equal(predicted: str, reference: str) -> bool:
  """Whether two final answers agree: by value when both are numbers, else as normalised
  strings (`normalize_answer`); an empty prediction never does."""
  p, r = normalize_answer(predicted), normalize_answer(reference)
  if not p:
    return False
  pn, rn = to_number(p), to_number(r)
  if pn is not None and rn is not None:
    return numbers_equal(pn, rn)
  return p == r


def math_reward(response: str, record: dict) -> float:
  """1.0 when the response's final answer (`final_answer`) equals the record's answer
  (`reference_answer`, `answers_equal`)."""
  answer = _answer_of(record)
  if answer is None or not isinstance(response, str):
    return 0.0
  predicted = final_answer(response)
  return float(predicted is not None and answers_equal(predicted, reference_answer(answer)))


# ---------------------------------------------------------------------------------------------
# code: the response's code against the record's tests, in a sandboxed subprocess

TIMEOUT_S = 5.0  # default wall-clock limit of one run (solution and all its tests)
MEMORY_LIMIT = 1 << 30  # bytes of address space
FILE_SIZE_LIMIT = 10 << 20  # bytes a file written by the child may grow to (its output too)
OUTPUT_CAP = 64 << 10  # bytes of the child's stdout and stderr kept in `CodeRun.output`
_RESULTS_CAP = 1 << 20  # bytes of result lines asked of the pipe (the kernel may give 64 KiB)
_PYTHON_FLAGS = ("-I", "-S", "-B")
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# The child: reads {solution, tests, nonce, fd, work, limits} (JSON) from stdin, sets the limits,
# installs the audit hook, runs the solution once as module `solution`, then each test in its
# namespace, and writes `<nonce> loaded`, then `<nonce> <i> pass|fail` per test, to the pipe
# `fd`. What it needs once the guest code started is held in locals (the builtins the guest
# could rebind included); it ends with os._exit (no atexit handlers, no waiting for threads).
_CHILD = r'''
import _posixsubprocess, json, os, posix, resource, sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
DENIED = frozenset({
    "os.chdir", "os.link", "os.symlink",
    "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyaddr",
    "socket.gethostbyname", "socket.sendmsg", "socket.sendto", "socket.sethostname",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
    "cpython.PyInterpreterState_New",
    "resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
BLOCKED_MODULES = frozenset({"_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                             "_testinternalcapi", "_testmultiphase"})
# file system changes: event -> ((index of a path argument, index of its dir_fd or None), ...)
CHANGES = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
}
WRITABLE_FILES = frozenset({"/dev/null"})


def guard(work):
  """Installs the audit hook (module doc of llada_jax.train.rewards). It uses only C functions
  and builtins bound here, so the guest cannot change its decisions by patching modules."""
  lstat, readlink, stat, getcwd = posix.lstat, posix.readlink, posix.stat, posix.getcwd
  isinstance_, str_, bytes_, int_ = isinstance, str, bytes, int
  refused, oserror = PermissionError, OSError
  denied, blocked, changes, writable = DENIED, BLOCKED_MODULES, dict(CHANGES), WRITABLE_FILES
  write_flags = WRITE_FLAGS

  def resolve(path):
    """`path` made absolute, symbolic links followed (as os.path.realpath)."""
    if not path.startswith("/"):
      path = getcwd() + "/" + path
    todo, parts, hops = path.split("/")[::-1], [], 0
    while todo:
      name = todo.pop()
      if name == "" or name == ".":
        continue
      if name == "..":
        if parts:
          parts.pop()
        continue
      here = "/" + "/".join(parts) + ("/" if parts else "") + name
      try:
        mode = lstat(here).st_mode
      except oserror:
        parts.append(name)
        continue
      if (mode & 0o170000) != 0o120000:
        parts.append(name)
        continue
      hops += 1
      if hops > 40:
        raise refused("sandbox: too many symbolic links")
      target = readlink(here)
      if target.startswith("/"):
        parts = []
      todo.extend(target.split("/")[::-1])
    return "/" + "/".join(parts)

  work = resolve(work)

  def text(path):
    if isinstance_(path, bytes_):
      return path.decode("utf-8", "surrogateescape")
    return path if isinstance_(path, str_) else None

  def inside(path, dir_fd=None):
    """Whether `path` (relative ones from `dir_fd`, a directory descriptor, if given) is in the
    working directory."""
    path = text(path)
    if path is None:
      return False
    if isinstance_(dir_fd, int_) and dir_fd >= 0 and not path.startswith("/"):
      path = readlink(f"/proc/self/fd/{dir_fd}") + "/" + path
    real = resolve(path)
    return real == work or real.startswith(work + "/")

  def is_dir(path):
    try:
      return (stat(path).st_mode & 0o170000) == 0o040000
    except oserror:
      return False

  def check_open(path, mode, flags):
    if isinstance_(path, int_):  # an open descriptor
      return
    name = text(path)
    if name is None or "/fd/" in name:  # /proc/*/fd/N, /dev/fd/N: the result pipe, say
      raise refused(f"sandbox: opening {path!r}")
    writing = (flags or 0) & write_flags or (isinstance_(mode, str_) and (
        "w" in mode or "a" in mode or "x" in mode or "+" in mode))
    if writing and name not in writable and not inside(name):
      raise refused(f"sandbox: writing outside the working directory ({path!r})")
    if is_dir(name) and not inside(name):
      raise refused(f"sandbox: opening a directory outside the working directory ({path!r})")

  def hook(event, args):
    if event == "open":
      check_open(*args)
      return
    change = changes.get(event)
    if change is not None:
      for i, j in change:
        if not inside(args[i], None if j is None else args[j]):
          raise refused(f"sandbox: {event} outside the working directory ({args[i]!r})")
      return
    if event == "import" and args[0] in blocked:
      raise refused(f"sandbox: importing {args[0]} is not allowed")
    if event in denied:
      raise refused(f"sandbox: {event} is not allowed")

  sys.addaudithook(hook)


def refuse_fork_exec(*args, **kwargs):
  """Stands in for `_posixsubprocess.fork_exec`, which starts processes without an audit event
  (multiprocessing calls it directly)."""
  raise PermissionError("sandbox: starting processes is not allowed")


def describer():
  """A function writing `<what>: <exception type>: <message>` to stderr (fd 2), bound to the
  builtins of now."""
  write, type_, str_, failure = os.write, type, str, BaseException

  def describe(what, error):
    try:
      line = f"{what}: {type_(error).__name__}: {str_(error)[:500]}\n"
      write(2, line.encode("utf-8", "replace"))
    except failure:
      pass
  return describe


def limit(limits):
  """Sets each `RLIMIT_<name>` of `limits` (soft and hard), where the platform has it."""
  for name, value in limits.items():
    kind = getattr(resource, "RLIMIT_" + name, None)
    if kind is not None:
      resource.setrlimit(kind, (value, value))


def main():
  payload = json.loads(sys.stdin.buffer.read())
  limit(payload["limits"])
  write, exit_, exec_, compile_, enumerate_ = os.write, os._exit, exec, compile, enumerate
  failure, describe = BaseException, describer()
  fd, nonce = payload["fd"], payload["nonce"].encode()
  solution, tests = payload["solution"], tuple(payload["tests"])
  module = type(sys)("solution")
  sys.modules["solution"] = module
  namespace = module.__dict__
  flushes = (sys.stdout.flush, sys.stderr.flush)
  _posixsubprocess.fork_exec = refuse_fork_exec  # and the hook refuses loading it afresh
  guard(payload["work"])
  del payload
  try:
    exec_(compile_(solution, "solution.py", "exec"), namespace)
  except failure as e:
    describe("solution", e)
    exit_(1)
  write(fd, nonce + b" loaded\n")
  for i, test in enumerate_(tests):
    try:
      exec_(compile_(test, f"test_{i}.py", "exec"), namespace)
      outcome = b"pass"
    except failure as e:
      describe(f"test {i}", e)
      outcome = b"fail"
    write(fd, b"%s %d %s\n" % (nonce, i, outcome))
  for flush in flushes:
    try:
      flush()
    except failure:
      pass
  exit_(0)


main()
'''


@dataclasses.dataclass(frozen=True)
class CodeRun:
  """What one sandboxed run of a solution against its tests gave."""
  passed: int  # tests that passed (0 when the solution did not load)
  total: int  # tests given
  loaded: bool  # the solution ran to its end without an error
  timed_out: bool  # the wall-clock limit ended the run
  returncode: int | None  # the child's exit status (negative: killed by that signal)
  output: str  # the start (`OUTPUT_CAP` bytes) of the child's stdout and stderr

  @property
  def fraction(self) -> float:
    """Passed tests over all tests (0.0 without tests)."""
    return self.passed / self.total if self.total else 0.0


def extract_code(response: str) -> str:
  """The code of a response: its last fenced block (```python ... ``` or ``` ... ```; an unclosed
  last fence runs to the end), else the whole response."""
  blocks = _FENCE.findall(response)
  return blocks[-1] if blocks else response


def _child_env(work: str) -> dict[str, str]:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": work,
          "HOME": work}


def _limits(timeout: float) -> dict[str, int]:
  """The child's resource limits (module doc), by `RLIMIT_` name."""
  return dict(AS=MEMORY_LIMIT, CPU=_math.ceil(timeout) + 1, FSIZE=FILE_SIZE_LIMIT, CORE=0)


def _kill_group(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _wait(proc: subprocess.Popen, payload: bytes, timeout: float) -> bool:
  """Sends the child its payload and waits; whether it timed out. A child still running then
  (timed out, or interrupted) is killed with its process group, and the child reaped."""
  try:
    proc.communicate(payload, timeout=timeout)
    return False
  except subprocess.TimeoutExpired:
    return True
  finally:
    if proc.returncode is None:  # not reaped: its pid (and group id) is still ours
      _kill_group(proc.pid)
    if proc.stdin is not None and not proc.stdin.closed:
      try:
        proc.stdin.close()
      except OSError:
        pass
    proc.wait()


def _drain(fd: int) -> bytes:
  """What a pipe holds, without waiting for more (its writers are gone or stuck)."""
  os.set_blocking(fd, False)
  chunks = []
  while True:
    try:
      chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
      break
    if not chunk:
      break
    chunks.append(chunk)
  return b"".join(chunks)


def _results_pipe() -> tuple[int, int]:
  """(read end, write end) of a pipe for the child's result lines, enlarged where allowed (a
  pipe holds at least 64 KiB: some 2,500 tests' lines, as the parent reads it at the end)."""
  r, w = os.pipe()
  try:
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _RESULTS_CAP)
  except (AttributeError, OSError):  # not Linux; above /proc/sys/fs/pipe-max-size
    pass
  return r, w


def _run_child(code: str, tests: list[str], nonce: str, work: str, out, timeout: float):
  """(result lines, finished child, whether it timed out) of one sandboxed run."""
  r, w = _results_pipe()
  try:
    payload = json.dumps(dict(solution=code, tests=tests, nonce=nonce, fd=w, work=work,
                              limits=_limits(timeout)))
    try:
      proc = subprocess.Popen(
          [sys.executable, *_PYTHON_FLAGS, "-c", _CHILD], cwd=work, env=_child_env(work),
          stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, pass_fds=(w,),
          start_new_session=True)
    finally:
      os.close(w)
    timed_out = _wait(proc, payload.encode(), timeout)
    return _drain(r).decode("ascii", "replace"), proc, timed_out
  finally:
    os.close(r)


def _parse_results(text: str, nonce: str, total: int) -> tuple[bool, int]:
  """(loaded, passed tests) from the child's result lines; lines without the nonce are ignored."""
  loaded, passed = False, set()
  for line in text.splitlines():
    parts = line.split(" ")
    if parts[0] != nonce:
      continue
    if parts[1:] == ["loaded"]:
      loaded = True
    elif (len(parts) == 3 and parts[2] == "pass" and parts[1].isascii() and parts[1].isdigit()
          and int(parts[1]) < total):
      passed.add(int(parts[1]))
  return loaded, len(passed) if loaded else 0


def run_tests(code: str, tests: str | Sequence[str], *, timeout: float = TIMEOUT_S) -> CodeRun:
  """Runs `code` once, then each test (Python source; a string is one test) in its namespace, in
  one sandboxed subprocess (module doc) limited to `timeout` seconds of wall-clock time.

  Raises OSError only when the sandbox itself cannot start (no temp directory, no interpreter):
  whatever the code does is a `CodeRun`."""
  tests = [tests] if isinstance(tests, str) else list(tests)
  nonce = secrets.token_hex(8)
  with tempfile.TemporaryDirectory(prefix="llada_reward_", ignore_cleanup_errors=True) as tmp:
    work = os.path.join(tmp, "work")
    os.mkdir(work)
    with open(os.path.join(tmp, "output"), "w+b") as out:
      lines, proc, timed_out = _run_child(code, tests, nonce, work, out, timeout)
      out.seek(0)
      output = out.read(OUTPUT_CAP).decode("utf-8", "replace")
  loaded, passed = _parse_results(lines, nonce, len(tests))
  return CodeRun(passed=passed, total=len(tests), loaded=loaded, timed_out=timed_out,
                 returncode=proc.returncode, output=output)


def _tests_of(record) -> list[str] | None:
  """The record's tests as a non-empty list of sources, or None."""
  tests = record.get("tests") if isinstance(record, dict) else None
  if isinstance(tests, str):
    tests = [tests]
  if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
    return tests
  return None


def code_reward(response: str, record: dict, *, timeout: float = TIMEOUT_S) -> float:
  """The fraction of the record's tests the response's code (`extract_code`) passes
  (`run_tests`); 0.0 when it does not load, or without tests."""
  tests = _tests_of(record)
  if tests is None or not isinstance(response, str):
    return 0.0
  return run_tests(extract_code(response), tests, timeout=timeout).fraction


# ---------------------------------------------------------------------------------------------
# the toy tasks' rewards, on records


def char_overlap(response: str, record: dict) -> float:
  """`toy_tasks.char_overlap` of the response and the record's answer."""
  answer = _answer_of(record)
  if answer is None or not isinstance(response, str):
    return 0.0
  return toy_tasks.char_overlap(response, answer)


def match_any(response: str, record: dict) -> float:
  """`toy_tasks.match_any`: 1.0 when the response is one of the `|`-separated answers."""
  answer = _answer_of(record)
  if answer is None or not isinstance(response, str):
    return 0.0
  return toy_tasks.match_any(response, answer)


REWARDS: dict[str, Reward] = {
    "exact_match": exact_match, "math": math_reward, "code": code_reward,
    "char_overlap": char_overlap, "match_any": match_any,
}
# the record field each reward reads (the prompt set loader rejects records without it)
REQUIRED_FIELDS: dict[str, str] = {
    "exact_match": "answer", "math": "answer", "code": "tests", "char_overlap": "answer",
    "match_any": "answer",
}


def get_reward(name: str) -> Reward:
  """The reward called `name` (a key of `REWARDS`)."""
  if name not in REWARDS:
    raise ValueError(f"reward {name!r} (choose from {', '.join(REWARDS)})")
  return REWARDS[name]
