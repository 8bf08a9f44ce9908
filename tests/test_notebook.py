"""The Colab demo notebook runs top to bottom as a Colab user runs it: in a fresh virtual
environment that has only a Jupyter kernel, from a directory outside the repository, its first
cell installing llada_jax (a regular install of this checkout, `LLADA_JAX_SOURCE`) into the
running kernel without a restart; then the embedded model decodes in both modes."""

import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_colab_demo_executes_in_a_fresh_environment(tmp_path, monkeypatch):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "-q", "ipykernel"], check=True, timeout=600)
  spec = tmp_path / "jupyter" / "kernels" / "fresh"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fresh venv", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("LLADA_JAX_SOURCE", ROOT)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("PYTHONPATH", raising=False)
  work = tmp_path / "colab"
  work.mkdir()
  nb = nbformat.read(os.path.join(ROOT, "experiments", "colab_demo.ipynb"), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="fresh",
                 resources={"metadata": {"path": str(work)}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  site = str(venv)
  assert f"from {site}" in text  # llada_jax came from the fresh venv, not this checkout
  assert "--- quality: nfe" in text and "--- speedy: nfe" in text
  assert "no TPU runtime: skipped the full-size model" in text
  html = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
          if "text/html" in o.get("data", {})]
  assert html and "<" in html[0]  # the trajectory view was rendered
