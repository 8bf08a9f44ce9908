"""The Colab demo notebook runs top to bottom on the embedded model."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_demo_executes():
  path = os.path.join(ROOT, "experiments", "colab_demo.ipynb")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  assert "--- quality: nfe" in text and "--- speedy: nfe" in text
  assert "skipped the full-size model" in text
  html = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
          if "text/html" in o.get("data", {})]
  assert html and "<" in html[0]  # the trajectory view was rendered
