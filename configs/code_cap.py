"""Default code model, stage 5: CAP (confidence-aware parallel) training on the idiom mix.

The `code_idioms` objective plus the CAP loss (SPEC 5.1: the entropy of the predictions at the
masked positions the model already gets right, weight `cap_weight`, dFactory's `confidence_beta`):
sharper predictions where the model is right, so that more of them pass the decoding threshold
in one forward. `experiments/train_default_model.py` also trains the same stage with weights 0,
0.5 and 2.0 to measure what CAP buys and costs: 1.0 is the smallest of those that reaches two
tokens per forward in Speedy mode on the held-out idiom prompts (chosen on the same prompts the
README reports); dFactory's recommended 2.0 fills more but degrades the text
(`experiments/results/code_model.md`).
"""

from llada_jax.train.defaults import code_model_config


def get_config():
  c = code_model_config("idiom_mix")
  c.objective.cap_weight = 1.0  # confidence_beta (dFactory recommends 2.0: see above)
  c.optim.lr = 3e-4
  c.steps = 1000
  c.seed = 1  # another data order than code_idioms
  c.ckpt_every = 200
  return c
