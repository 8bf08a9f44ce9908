"""One process of the 2-process CPU test (`test_parallel_multihost.py`).

  python tests/parallel_multihost_worker.py --coordinator_address 127.0.0.1:PORT \
      --num_processes 2 --process_id I --local_device_count 2 --out FILE.npz [--mesh SPEC]

Every process loads the fixture, places its shards of the params / optimizer state / batch on
the global mesh (4 CPU devices over 2 processes, gloo collectives), runs one sharded train step
of `parallel_checks.train_step` (forward logits, loss, gradients, updated params), gathers the
results and process 0 writes them to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from llada_jax.parallel import distributed  # noqa: E402


def main() -> None:
  p = distributed.add_flags(argparse.ArgumentParser())
  p.add_argument("--mesh", default="fsdp=2,expert=2")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  distributed.initialize(distributed.config_from(args), platform="cpu")

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  import parallel_checks as pc
  from llada_jax import parallel

  print(distributed.describe(), flush=True)
  assert jax.process_count() == args.num_processes
  config, params, gold = pc.load("llada2_tiny")
  ids, targets = pc.batch(config, gold)
  mesh = parallel.make_mesh(args.mesh)
  step, ps, os_, tok = pc.sharded_train_step(config, mesh, ids.shape)
  with jax.set_mesh(mesh):
    new_params, _, loss, logits, grads = step(
        parallel.put(params, ps), parallel.put(pc.OPTIMIZER.init(params), os_),
        parallel.put(ids, tok), parallel.put(targets, tok))
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  flat = lambda prefix, tree: {
      prefix + jax.tree_util.keystr(path): gather(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  result = dict(loss=gather(loss), logits=gather(logits),
                **flat("grads", grads), **flat("params", new_params))
  if jax.process_index() == 0:
    np.savez(args.out, **result)
  multihost_utils.sync_global_devices("done")
  print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  main()
