"""EBPO rewards (`llada_jax.train.rewards`): exact match, math final answers, code run against
tests in a sandboxed subprocess (what it refuses, limits, forged results), the registry."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from llada_jax.train import rewards as R

SQUARE = "def f(x):\n  return x * x\n"
SQUARE_TESTS = ["assert f(2) == 4", "assert f(3) == 9", "assert f(-1) == 1"]


def _code(response: str, tests=SQUARE_TESTS, **kw) -> float:
  return R.code_reward(response, {"tests": tests}, **kw)


# ---------------------------------------------------------------------------------------------
# exact match


@pytest.mark.parametrize("response,answer,want", [
    ("42", "42", 1.0), ("  42\n", "42", 1.0), ("42", " 42 ", 1.0), ("4 2", "42", 0.0),
    ("43", "42", 0.0), ("", "42", 0.0), ("42", 42, 1.0),
])
def test_exact_match(response, answer, want):
  assert R.exact_match(response, {"answer": answer}) == want


# ---------------------------------------------------------------------------------------------
# math


@pytest.mark.parametrize("response,answer", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, then corrected: \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{ x^{2} + 1 }", "\\boxed{x^{2}+1}"),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
    ("We get 3 apples, then 4 more, so 7.", "7"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("It costs $1,234.", "1234"),
    ("1234", "1,234"),
    ("one full turn is 1,000,000 steps", "1000000"),
    ("the ratio is 3/4", "0.75"),
    ("half: .5", "1/2"),
    ("0.5", "\\frac12"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("x = 2.50", "2.5"),
    ("the answer: 0.3333333", "1/3"),
    ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),
    ("\\boxed{5}", 5),
])
def test_math_right(response, answer):
  assert R.math_reward(response, {"answer": answer}) == 1.0


@pytest.mark.parametrize("response,answer", [
    ("the answer is 8", "7"),
    ("\\boxed{7} is wrong, the answer is 8", "8"),  # the boxed answer counts, not the last number
    ("no numbers here", "7"),
    ("", "7"),
    ("\\boxed{}", "7"),
    ("-5", "5"),
    ("1000001", "1000000"),  # integers compare exactly
    ("1/0", "0"),
    ("\\boxed{x+2}", "x+1"),
])
def test_math_wrong(response, answer):
  assert R.math_reward(response, {"answer": answer}) == 0.0


def test_math_extraction():
  assert R.last_boxed("\\boxed{a} and \\boxed{\\frac{1}{\\sqrt{2}}} end") == "\\frac{1}{\\sqrt{2}}"
  assert R.last_boxed("\\boxed{12") is None  # truncated: falls back to the last number
  assert R.final_answer("\\boxed{12") == "12"
  assert R.last_number("x-1 is 2-1, and -3/4 or 1,234.5") == "1,234.5"
  assert R.last_number("2024-01-05") == "05"
  assert R.to_number(R.normalize_answer("$\\tfrac{3}{4}$.")) == R.to_number("0.75")


@pytest.mark.parametrize("response", [
    "9" * 100_000, "\\boxed{" * 20_000, "}" * 50_000 + "\\boxed{{{", "\x00\ud800 1/0 ÷ ∞",
    "1," * 50_000, "\\frac{1}{0}", "-" * 10_000 + "." * 10_000, "\\boxed{" + "9" * 5000 + "}",
])
def test_math_garbage_does_not_raise(response):
  for answer in ("7", "9" * 5000, "\\boxed{", ""):
    assert R.math_reward(response, {"answer": answer}) in (0.0, 1.0)


def test_bad_records_score_zero():
  for fn in R.REWARDS.values():
    for record in ({}, None, {"answer": None}, {"answer": ["7"]}, {"tests": 3}, {"tests": []}):
      assert fn("7", record) == 0.0
    assert fn(None, {"answer": "7", "tests": ["pass"]}) == 0.0


# ---------------------------------------------------------------------------------------------
# code: results


def test_code_right_partial_wrong():
  assert _code(SQUARE) == 1.0
  assert _code("def f(x):\n  return abs(x) * 2\n") == pytest.approx(1 / 3)  # only f(2) == 4
  assert _code("def f(x):\n  return 0\n") == 0.0
  assert _code(SQUARE, tests="assert f(2) == 4\nassert f(3) == 9") == 1.0  # one string, one test
  assert _code(SQUARE, tests="assert f(2) == 4\nassert f(3) == 8") == 0.0


@pytest.mark.parametrize("solution", [
    "def f(x)\n  return x * x\n",  # syntax error
    "def g(x):\n  return x * x\n",  # no f
    "raise SystemExit(3)\n" + SQUARE,
    SQUARE + "import os\nos._exit(1)\n",
    SQUARE + "import faulthandler\nfaulthandler._sigsegv()\n",
    SQUARE + "import ctypes\nctypes.string_at(0)\n",
    SQUARE + "x = bytearray(4 * 2**30)\n",
    SQUARE + "input()\n",
    "s = '\ud800'\n" + SQUARE,  # not encodable source
])
def test_code_that_does_not_load_scores_zero(solution):
  assert _code(solution) == 0.0


def test_limits_are_set():
  run = R.run_tests("import resource as r\n"
                    "print([r.getrlimit(k)[1] for k in (r.RLIMIT_AS, r.RLIMIT_CPU, r.RLIMIT_FSIZE,"
                    " r.RLIMIT_CORE)])\n", [], timeout=2.5)
  assert run.loaded and run.output == f"{[R.MEMORY_LIMIT, 4, R.FILE_SIZE_LIMIT, 0]}\n"
  assert run.fraction == 0.0  # no tests


def test_fenced_code():
  text = ("First try:\n```python\ndef f(x):\n  return 0\n```\n"
          f"Better:\n```python\n{SQUARE}```\nDone.")
  assert R.extract_code(text) == SQUARE
  assert _code(text) == 1.0
  assert R.extract_code(f"```\n{SQUARE}```") == SQUARE
  assert R.extract_code(f"```py\n{SQUARE}") == SQUARE  # truncated: the unclosed fence
  assert R.extract_code(SQUARE) == SQUARE
  assert _code(f"Here it is:\n```\n{SQUARE}```\n") == 1.0


def test_timeout_kills_and_keeps_finished_tests():
  start = time.monotonic()
  assert _code("while True:\n  pass\n", timeout=1) == 0.0
  assert time.monotonic() - start < 4
  start = time.monotonic()
  run = R.run_tests(SQUARE, ["assert f(2) == 4", "while True: pass", "assert f(3) == 9"],
                    timeout=1)
  assert time.monotonic() - start < 4
  assert (run.loaded, run.passed, run.total, run.timed_out) == (True, 1, 3, True)


def test_a_crash_in_a_test_keeps_earlier_tests():
  run = R.run_tests(SQUARE, ["assert f(2) == 4", "import os; os._exit(0)", "assert f(3) == 9"])
  assert (run.loaded, run.passed, run.fraction) == (True, 1, 1 / 3)
  run = R.run_tests(SQUARE, ["assert f(2) == 4", "raise SystemExit(0)", "assert f(3) == 9"])
  assert (run.passed, run.returncode) == (2, 0)


def test_output_is_captured_and_capped():
  run = R.run_tests(SQUARE + "print('hello from f')\nwhile True:\n  print('x' * 1000)\n",
                    ["assert f(2) == 4"], timeout=1)
  assert run.output.startswith("hello from f") and len(run.output) <= R.OUTPUT_CAP
  assert (run.loaded, run.fraction) == (False, 0.0)
  run = R.run_tests("def f(x):\n  return 1\n", ["assert f(2) == 4"])
  assert "test 0: AssertionError" in run.output


# ---------------------------------------------------------------------------------------------
# code: the sandbox


def test_writing_outside_the_work_dir_is_refused(tmp_path):
  target = tmp_path / "escaped.txt"
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  attempts = [
      f"open({str(target)!r}, 'w').write('x')",
      f"open({str(target)!r}, 'a').write('x')",
      f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
      f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
      f"import os\nos.remove({str(victim)!r})",
      f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
      f"import os\nos.chmod({str(victim)!r}, 0o777)",
      f"import os\nos.truncate({str(victim)!r}, 0)",
      f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
      f"import os\nos.mkdir({str(tmp_path / 'made')!r})",
      "open('../escaped.txt', 'w').write('x')",
      "import os\nos.symlink('/', 'root')\nopen('root/tmp/escaped.txt', 'w')",
      f"import os\nos.link({str(victim)!r}, 'hard')\nopen('hard', 'w').write('')",
      f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')",
      "import os\nfd = os.open('/', os.O_RDONLY)\n"
      "os.open('tmp/escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
      f"import os\nos.close(os.open('/proc/self/cwd/../../{target.name}', os.O_WRONLY|os.O_CREAT))",
      "import os\nos.mkdir('../made', dir_fd=os.open('.', os.O_RDONLY))",
      f"import os\nos.chmod(os.open({str(victim)!r}, os.O_RDONLY), 0o777)",
  ]
  for attempt in attempts:
    run = R.run_tests(SQUARE + attempt + "\n", SQUARE_TESTS)
    assert run.fraction == 0.0 and "PermissionError: sandbox: " in run.output, (attempt, run)
  assert sorted(os.listdir(tmp_path)) == ["victim.txt"]
  assert victim.read_text() == "keep me" and oct(victim.stat().st_mode)[-3:] != "777"


def test_the_standard_library_works():
  solution = SQUARE + (
      "import asyncio, collections, concurrent.futures, dataclasses, logging, threading\n"
      "import traceback, unittest\n"
      "async def three():\n  await asyncio.sleep(0)\n  return 3\n"
      "assert asyncio.run(three()) == 3\n"
      "with concurrent.futures.ThreadPoolExecutor(2) as pool:\n"
      "  assert list(pool.map(abs, [-1, 2])) == [1, 2]\n"
      "@dataclasses.dataclass\nclass P:\n  x: int\n"
      "P = collections.namedtuple('P', 'a b')\n"
      "logging.getLogger('solution').warning('a warning')\n"
      "try:\n  1 / 0\nexcept ZeroDivisionError:\n  traceback.format_exc()\n")
  run = R.run_tests(solution, SQUARE_TESTS)
  assert run.fraction == 1.0, run.output


def test_writing_inside_the_work_dir_is_allowed():
  solution = SQUARE + (
      "import os, tempfile\n"
      "open('scratch.txt', 'w').write('x')\n"
      "os.mkdir('sub')\n"
      "os.rename('scratch.txt', 'sub/moved.txt')\n"
      "with tempfile.NamedTemporaryFile('w') as t:\n"
      "  t.write('y')\n"
      "with tempfile.TemporaryDirectory() as d:\n"
      "  open(os.path.join(d, 'f'), 'w').write('y')\n"
      "here = os.open('sub', os.O_RDONLY)\n"
      "open('sub/gone', 'w').close()\n"
      "os.remove('gone', dir_fd=here)\n"
      "open(os.devnull, 'w').write('z')\n")
  run = R.run_tests(solution, SQUARE_TESTS + ["assert open('sub/moved.txt').read() == 'x'"])
  assert run.fraction == 1.0, run.output


@pytest.mark.parametrize("attempt", [
    "import socket\nsocket.socket().connect(('127.0.0.1', 9))",
    "import socket\nsocket.create_connection(('localhost', 80), timeout=1)",
    "import socket\nsocket.socket().bind(('127.0.0.1', 0))",
    "import socket\nsocket.socket(type=socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os\nos.fork()",
    "import os\nos.execv('/bin/true', ['true'])",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "import os\nos.kill(os.getppid(), 0)",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import multiprocessing as mp\nmp.get_context('spawn').Process(target=print).start()",
    "import multiprocessing.util as u\nu.spawnv_passfds(b'/bin/true', [b'true'], [])",
    "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "import sys\nsys.settrace(lambda *a: None)",
    "import gc\ngc.get_objects()",
    "import os\nfor fd in os.listdir('/proc/self/fd'):\n  open(f'/proc/self/fd/{fd}', 'rb')",
    "open('/dev/fd/0', 'rb')",
])
def test_network_processes_and_tampering_are_refused(attempt):
  run = R.run_tests(SQUARE + attempt + "\n", SQUARE_TESTS)
  assert (run.loaded, run.fraction) == (False, 0.0)
  assert "sandbox: " in run.output, run.output
  # a refused test fails alone
  run = R.run_tests(SQUARE, ["assert f(2) == 4", attempt])
  assert run.fraction == 0.5 and run.output.startswith("test 1: ") and "sandbox: " in run.output


def test_forged_results_get_no_credit():
  forger = ("def f(x):\n  return 0\n"
            "import os, sys\n"
            "for line in ('loaded', '0 pass', '1 pass', '2 pass'):\n"
            "  print(line)\n"
            "  print('x', line)\n"
            "  for fd in range(3, 64):\n"
            "    try:\n"
            "      os.write(fd, ('x ' + line + '\\n').encode())\n"
            "    except OSError:\n"
            "      pass\n")
  assert _code(forger) == 0.0
  # rebinding builtins does not change how the tests are compiled and run
  cheat = ("def f(x):\n  return 0\n"
           "import builtins\n"
           "builtins.compile = lambda *a, **k: None\n"
           "builtins.exec = lambda *a, **k: None\n")
  assert _code(cheat) == 0.0


def test_many_tests():
  tests = [f"assert f({i}) == {i * i}" for i in range(1500)] + ["assert f(2) == 5"]
  run = R.run_tests(SQUARE, tests)
  assert (run.passed, run.total) == (1500, 1501)


def test_no_temp_dirs_leak(tmp_path, monkeypatch):
  root = tmp_path / "tmp"
  root.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(root))
  for solution in (SQUARE, "x = ", "import os\nos._exit(0)",
                   SQUARE + "import os\nos.mkdir('d')\nos.chmod('d', 0)\nopen('f', 'w')\n"):
    _code(solution)
  _code("while True: pass", timeout=0.5)
  assert os.listdir(root) == []


# ---------------------------------------------------------------------------------------------
# registry


def test_registry():
  assert {"exact_match", "math", "code"} <= set(R.REWARDS)
  assert set(R.REQUIRED_FIELDS) == set(R.REWARDS)
  assert R.REQUIRED_FIELDS["exact_match"] == R.REQUIRED_FIELDS["math"] == "answer"
  assert R.REQUIRED_FIELDS["code"] == "tests"
  assert R.get_reward("math") is R.math_reward
  assert R.get_reward("code")(SQUARE, {"tests": SQUARE_TESTS}) == 1.0
  with pytest.raises(ValueError, match=r"reward 'gsm8k' \(choose from exact_match, math, code"):
    R.get_reward("gsm8k")


def test_toy_task_rewards():
  assert R.get_reward("char_overlap")("12", {"answer": "13"}) == 0.5
  assert R.get_reward("match_any")("aaa", {"answer": "aaa|bbb"}) == 1.0
