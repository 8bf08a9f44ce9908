"""Optional packages: a missing one is named in one line with the extra that installs it."""

import subprocess
import sys

import pytest

from llada_jax import optional


def test_missing_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  with pytest.raises(optional.MissingDependency) as e:
    optional.require("matplotlib.pyplot", "drawing a trajectory PNG")
  msg = str(e.value)
  assert "\n" not in msg
  assert "drawing a trajectory PNG needs matplotlib" in msg
  assert 'pip install -e ".[plot]"' in msg


def test_present_package_is_returned():
  assert optional.require("json", "x").dumps([1]) == "[1]"


def test_entry_point_exits_with_one_line_before_work():
  code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
          "from llada_jax import optional\n"
          "optional.require_or_exit('matplotlib.pyplot', 'the plots')\n"
          "print('slow work ran')\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert r.returncode == 2
  assert "slow work ran" not in r.stdout
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "the plots needs matplotlib" in lines[0], r.stderr
