"""Optional dependencies: import them with a one-line hint naming the extra that installs them."""

from __future__ import annotations

import importlib

# module -> the `pip install -e ".[EXTRA]"` extra of pyproject.toml that provides it.
EXTRAS = {
    "matplotlib": "plot",
}


class MissingDependency(ImportError):
  """An optional package is not installed; the message says how to install it."""


def require(module: str, purpose: str):
  """Imports `module` (e.g. "matplotlib.pyplot") or raises `MissingDependency` with one line:
  what needs it and which extra installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    how = f'pip install -e ".[{extra}]"' if extra else f"pip install {top}"
    raise MissingDependency(f"{purpose} needs {top}, which is not installed: {how}") from e


def require_or_exit(module: str, purpose: str):
  """`require` for entry points: a missing package ends the program with its one line (exit 2)
  before any slow work."""
  try:
    return require(module, purpose)
  except MissingDependency as e:
    import sys  # noqa: PLC0415
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
