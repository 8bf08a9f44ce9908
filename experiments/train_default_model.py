"""Reproduce the embedded default model from scratch (real data: the Python standard library).

  python experiments/train_default_model.py --workdir out/default_model [--scale 1.0]

Steps, all with this package's own pipeline:
  1. corpus: the standard library's `.py` sources (no tests, no site-packages), minus a fixed
     held-out set of modules kept for evaluation (`HELD_OUT`), cut at blank lines into pieces
     of about `CHUNK_CHARS` characters, each its own document (so that shuffling mixes files:
     whole files packed back to back fill ~20 consecutive batches from one file);
  2. tokenizer: byte-level BPE (`tokenizers`, vocabulary 2048) with mask / EOS / chat tokens and
     a chat template;
  3. training: AR pretraining (block 1) -> WSD conversion to block diffusion (4 -> 32 -> whole
     sequence -> 32) -> the LLaDA2.1 M2T + T2T editing objective -> the same objective on a mix
     of the standard library and generated everyday Python (`experiments/python_idioms.py`,
     16000 modules; its held-out identifiers never appear) -> CAP, the confidence loss that
     lets the decoder fill several tokens per forward (configs `configs/code_*.py`); the CAP
     stage is also trained with CAP weights 0, 0.5 and 2.0 (`CAP_CONTROLS`; 2.0 is dFactory's
     recommended `confidence_beta`) to measure what CAP buys and costs;
  4. export: bf16 HF checkpoint + tokenizer into `llada_jax/assets/default_model` (with
     `--install`), which `python -m llada_jax.decode` uses when no --checkpoint is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "llada_jax", "assets", "default_model")
HELD_OUT = ("json", "textwrap", "fractions", "heapq", "bisect", "calendar", "shlex", "glob")
SPECIALS = ["<|endoftext|>", "<|mask|>", "<|pad|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
VOCAB = 2048
CHUNK_CHARS = 1500
IDIOM_DOCS = 16000
# The CAP stage again with other CAP weights (--cap-control), to measure what CAP buys and costs.
CAP_CONTROLS = (("code_cap_off", 0.0), ("code_cap_beta05", 0.5), ("code_cap_beta2", 2.0))
STDLIB_STAGES = ("code_ar", "code_wsd", "code_edit")


def stdlib_files() -> tuple[list[str], list[str]]:
  """(training files, held-out files) of the standard library's own Python sources."""
  lib = sysconfig.get_paths()["stdlib"]
  skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__",
          "ensurepip", "tkinter")
  train, held = [], []
  for d, dirs, files in os.walk(lib):
    dirs[:] = sorted(x for x in dirs if x not in skip)
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      path = os.path.join(d, f)
      module = os.path.relpath(path, lib)[:-3].replace(os.sep, ".")
      (held if module.split(".")[0] in HELD_OUT else train).append(path)
  return train, held


def split_source(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """Consecutive pieces of `text` (which they concatenate back to) of at least `chunk_chars`
  characters, cut after a blank line (or after any line once a piece reaches 3x the size)."""
  pieces, cur, size = [], [], 0
  for line in text.splitlines(keepends=True):
    cur.append(line)
    size += len(line)
    if (size >= chunk_chars and not line.strip()) or size >= 3 * chunk_chars:
      pieces.append("".join(cur))
      cur, size = [], 0
  if cur:
    pieces.append("".join(cur))
  return pieces


def stage_corpus(files: list[str], out: str) -> str:
  """Writes every file's pieces (`split_source`) as `out/FFFFF_PPPP.txt` documents."""
  if os.path.isdir(out):
    return out
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  n = 0
  for i, f in enumerate(files):
    with open(f, encoding="utf-8", errors="replace") as src:
      text = src.read()
    for k, piece in enumerate(split_source(text)):
      if piece.strip():
        with open(os.path.join(tmp, f"{i:05d}_{k:04d}.txt"), "w", encoding="utf-8") as dst:
          dst.write(piece)
        n += 1
  os.replace(tmp, out)
  print(f"corpus: {n} documents of about {CHUNK_CHARS} characters in {out}")
  return out


def stage_mix(workdir: str, corpus: str) -> str:
  """`workdir/mix`: the standard-library documents and `IDIOM_DOCS` generated modules (hard
  links, so nothing is copied), one corpus directory."""
  sys.path.insert(0, ROOT)
  from experiments import python_idioms
  mix = os.path.join(workdir, "mix")
  if os.path.isdir(mix):
    return mix
  idioms = python_idioms.write_corpus(os.path.join(workdir, "idioms"), IDIOM_DOCS, seed=0)
  tmp = mix + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  for sub, src in (("stdlib", corpus), ("idioms", idioms)):
    os.makedirs(os.path.join(tmp, sub))
    for f in sorted(os.listdir(src)):
      os.link(os.path.join(src, f), os.path.join(tmp, sub, f))
  os.replace(tmp, mix)
  print(f"mix: {len(os.listdir(corpus))} standard-library and {IDIOM_DOCS} generated documents")
  return mix


def train_tokenizer(files: list[str], out_dir: str) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  path = os.path.join(out_dir, "tokenizer.json")
  if os.path.exists(path):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=True)
  tok.train(files, trainer)
  tok.save(path)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>",
               "pad_token": "<|pad|>", "mask_token": "<|mask|>"}, f, indent=2)
  return out_dir


def special_ids(tok_dir: str) -> dict:
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
  return dict(eos_token_id=tok.token_to_id("<|endoftext|>"),
              mask_token_id=tok.token_to_id("<|mask|>"),
              pad_token_id=tok.token_to_id("<|pad|>"), vocab_size=tok.get_vocab_size())


def load_config(name: str):
  from ml_collections import config_flags  # noqa: F401  (ensures ml_collections is present)
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                   f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def run_stage(name: str, workdir: str, corpus: str, tok_dir: str, ids: dict, init_from: str,
              scale: float, config: str = "", **overrides) -> str:
  """Trains stage `name` (config `configs/{config or name}.py`, objective keys `overrides`)
  from `init_from` and exports it to `workdir/{name}_hf`, unless that already exists."""
  from llada_jax.train.trainer import Trainer
  cfg = load_config(config or name)
  for k, v in overrides.items():
    setattr(cfg.objective, k, v)
  cfg.data.source = corpus
  cfg.data.dataset_dir = os.path.join(workdir, "dataset")
  cfg.tokenizer = tok_dir
  cfg.init_from = init_from
  if not init_from:
    cfg.model.overrides.update(ids)
  cfg.steps = max(1, int(cfg.steps * scale))
  if cfg.wsd.enabled:
    cfg.wsd.stages = tuple((max(1, int(s * scale)), b) for s, b in cfg.wsd.stages)
    cfg.steps = sum(s for s, _ in cfg.wsd.stages)
  out = os.path.join(workdir, f"{name}_hf")
  cfg.export_hf = out
  if os.path.exists(os.path.join(out, "config.json")):
    print(f"[{name}] already done: {out}")
    return out
  t0 = time.time()
  last = Trainer(cfg, os.path.join(workdir, name)).run()
  print(f"[{name}] {cfg.steps} steps in {time.time() - t0:.0f}s: loss {last.get('loss'):.3f}")
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok_dir, f), out)
  return out


def install(src: str) -> None:
  """Copies the final checkpoint (as bf16) and tokenizer into the package assets, atomically."""
  import llada_jax
  config, params = llada_jax.load_hf_checkpoint(src)
  tmp = ASSET + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  llada_jax.save_hf_checkpoint(tmp, config, params, dtype="bfloat16")
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(src, f), tmp)
  with open(os.path.join(tmp, "README.md"), "w") as f:
    f.write(open(os.path.join(ROOT, "experiments", "default_model_card.md")).read())
  shutil.rmtree(ASSET, ignore_errors=True)
  os.replace(tmp, ASSET)
  print(f"installed {ASSET}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "out", "default_model"))
  p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
  p.add_argument("--install", action="store_true", help="install into llada_jax/assets")
  p.add_argument("--cap-control", action=argparse.BooleanOptionalAction, default=True,
                 help="also train the CAP stage with the weights of CAP_CONTROLS")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  train, held = stdlib_files()
  print(f"corpus: {len(train)} training files, {len(held)} held-out files ({', '.join(HELD_OUT)})")
  with open(os.path.join(args.workdir, "held_out_files.json"), "w") as f:
    json.dump(held, f, indent=1)
  corpus = stage_corpus(train, os.path.join(args.workdir, "corpus"))
  tok_dir = train_tokenizer(train, os.path.join(args.workdir, "tokenizer"))
  ids = special_ids(tok_dir)
  ckpt = ""
  for stage in STDLIB_STAGES:
    ckpt = run_stage(stage, args.workdir, corpus, tok_dir, ids, ckpt, args.scale)
  mix = stage_mix(args.workdir, corpus)
  idioms = run_stage("code_idioms", args.workdir, mix, tok_dir, ids, ckpt, args.scale)
  if args.cap_control:
    for name, weight in CAP_CONTROLS:
      run_stage(name, args.workdir, mix, tok_dir, ids, idioms, args.scale, config="code_cap",
                cap_weight=weight)
  ckpt = run_stage("code_cap", args.workdir, mix, tok_dir, ids, idioms, args.scale)
  if args.install:
    install(ckpt)
  return 0


if __name__ == "__main__":
  sys.exit(main())
