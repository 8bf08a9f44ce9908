"""8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): data=2 x expert=4,
dense all_to_all MoE at worst-case capacity (dropless), as in the tests."""

from llada_jax.parallel.mesh import parallel_config


def get_config():
  return parallel_config("data=2,expert=4")
