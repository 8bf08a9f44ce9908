"""LLaDA2.1-mini WSD conversion of an AR checkpoint on a TPU pod (SPEC 5.1; init_from an HF checkpoint).

Warmup grows the block 1 (the AR model as it is) -> 4 -> 32 -> 64 -> 4096 (the whole sequence:
MDLM), Stable trains at 4096, Decay shrinks it back to 2048 and then the decoding block 32.
Continual pre-training noises every mask ratio in (0, 1] with the ELBO's 1/t weighting (the
[0.3, 0.8] band is the SFT setting), and adds Gaussian noise to the embeddings of masked tokens
during the first `noise_steps` steps (the AR model's [MASK] embedding is ~0: without it the
gradient explodes at high mask ratios). Merge the best checkpoints afterwards with
`tools/merge_checkpoints.py --k 3` (the paper's top-k merge).
"""

from llada_jax.train.defaults import pod_config


def get_config():
  c = pod_config("mini", "bdlm")
  c.wsd.enabled = True
  c.wsd.stages = ((1000, 1), (2000, 4), (2000, 32), (2000, 64), (20000, 4096), (2000, 2048),
                  (2000, 32))
  c.steps = 31000
  c.objective.t_min, c.objective.t_max = 1e-3, 1.0
  c.objective.weighting = "inv_t"
  c.noise_steps = 500
  c.objective.mask_embed_noise = 0.05
  c.eval_every = 500  # held-out loss per checkpoint: what the top-k merge ranks by
  c.data.validation_fraction = 0.01
  return c
