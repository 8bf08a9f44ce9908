"""Shared fixtures: the golden checkpoints, loaded once per session."""

import json
import os

# Cheaper XLA:CPU code generation for every test (about half the compile time, which dominates
# the suite) and for the CLIs and workers the tests start (they inherit the environment).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import numpy as np
import pytest

import llada_jax

# The command-line entry points keep a persistent compilation cache in the user's cache
# directory by default; tests (and the CLIs they start) run without it unless a test asks for one
# (see pytest_configure for why).
os.environ["LLADA_JAX_COMPILATION_CACHE"] = "0"

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FIXTURE_NAMES = ("llada2_tiny", "llada2_tiny_groups")


class Golden:
  """One fixture set: its directory, config, params, golden arrays and generate runs."""

  def __init__(self, name):
    self.name = name
    self.dir = os.path.join(FIXTURES, name)
    self.config, self.params = llada_jax.load_hf_checkpoint(self.dir)
    self.npz = dict(np.load(os.path.join(self.dir, "golden.npz")))
    with open(os.path.join(self.dir, "golden.json")) as f:
      self.json = json.load(f)
    self.prompt = self.npz["gen_prompt_ids"].tolist()

  def runs(self):
    return self.json["generate"]


_CACHE = {}


def golden(name) -> Golden:
  if name not in _CACHE:
    _CACHE[name] = Golden(name)
  return _CACHE[name]


def run_kwargs(g: Golden, run: dict) -> dict:
  """`generate` keyword arguments reproducing a fixture run."""
  kw = dict(run["params"])
  algorithm = "llada2.1" if run["name"].startswith("v21") else "llada2.0"
  return dict(kw, algorithm=algorithm, mask_id=g.json["mask_id"])


def expected_output(g: Golden, run: dict) -> list:
  """The reference's generated tokens (the 2.0 early-stop path also returns the prompt)."""
  out = run["output_ids"]
  if run["name"].startswith("v20") and run["params"].get("eos_early_stop"):
    assert out[: len(g.prompt)] == g.prompt
    out = out[len(g.prompt):]
  return out


@pytest.fixture(scope="session", params=FIXTURE_NAMES)
def gold(request) -> Golden:
  return golden(request.param)


@pytest.fixture(scope="session")
def tiny() -> Golden:
  return golden("llada2_tiny")


def pytest_collection_modifyitems(config, items):
  """The long end-to-end checks (`slow`) first: with `-n 2` the workers then end together on
  short tests instead of one of them finishing a long subprocess test alone."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
  # No persistent compilation cache: on XLA:CPU (jax 0.10.2) writing and reading cached
  # executables segfaulted pytest workers three times in four full runs (in
  # compilation_cache.put_executable_and_time and get_executable_and_time), with shared and with
  # per-worker cache directories alike.
  jax.config.update("jax_enable_compilation_cache", False)


def write_tfds(records, features, data_dir, name):
  """A prepared tfds array_record dataset (split `train`) of `records`, as a user's own dataset
  would be: `features` maps each field to "text" or "messages" (a Sequence of role/content)."""
  import tensorflow_datasets as tfds
  feats = {k: (tfds.features.Text() if v == "text" else tfds.features.Sequence(
      {"role": tfds.features.Text(), "content": tfds.features.Text()}))
      for k, v in features.items()}

  def seq(msgs):
    return {"role": [m["role"] for m in msgs], "content": [m["content"] for m in msgs]}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, r in enumerate(records):
      yield str(i), {k: (r[k] if features[k] == "text" else seq(r[k])) for k in features}

  attrs = dict(name=name, VERSION=tfds.core.Version("1.0.0"), RELEASE_NOTES={"1.0.0": "test"},
               _info=_info, _split_generators=_split_generators,
               _generate_examples=_generate_examples, __module__=__name__, code_path=None)
  Builder = type(f"_Test_{name}", (tfds.core.GeneratorBasedBuilder,), attrs,
                 skip_registration=True)
  tfds.display_progress_bar(False)
  b = Builder(data_dir=str(data_dir), file_format="array_record")
  b.download_and_prepare()
  return str(data_dir / name)
