"""Scale-out: device meshes, logical-axis sharding rules, shard_map expert parallelism for the MoE,
sharded forward/decode helpers and multi-host start-up.

Typical use:

    mesh = parallel.make_mesh("data=2,expert=4")
    params = parallel.shard_params(params, config, mesh)
    logits = parallel.sharded_forward(params, config, input_ids, mesh, block_length=32)

`moe_impl="ep"` (dense all_to_all, any backend) or `"ep_ragged"` (ragged_all_to_all, TPU) runs
the MoE experts expert-parallel inside `jax.shard_map`; it needs a mesh in context
(`jax.set_mesh`), which the helpers here set.
"""

from llada_jax.parallel.expert_parallel import EPConfig, capacity, expert_parallel_moe, register_ep
from llada_jax.parallel.mesh import (AXES, default_parallel_config, format_mesh_shape,
                                     load_parallel_config, make_abstract_mesh, make_mesh,
                                     mesh_from_config, mesh_shape, parallel_config,
                                     parse_mesh_spec, resolve_mesh_shape)
from llada_jax.parallel.rules import (ACTIVATION_AXES, DEFAULT_RULES, activation_sharding,
                                      activation_spec, logical_to_spec, normalize_rules,
                                      opt_state_shardings, param_bytes_per_device,
                                      param_partition_specs, param_shardings, per_device_bytes,
                                      put, shard_params, sharded_param_shapes)
from llada_jax.parallel.sharded import sharded_forward, sharded_generate

__all__ = [
    "ACTIVATION_AXES", "AXES", "DEFAULT_RULES", "EPConfig", "activation_sharding",
    "activation_spec", "capacity", "default_parallel_config", "expert_parallel_moe",
    "format_mesh_shape", "load_parallel_config", "logical_to_spec", "make_abstract_mesh",
    "make_mesh",
    "mesh_from_config", "mesh_shape", "normalize_rules", "opt_state_shardings",
    "parallel_config", "param_bytes_per_device", "param_partition_specs", "param_shardings",
    "parse_mesh_spec", "per_device_bytes", "put", "register_ep", "resolve_mesh_shape",
    "shard_params", "sharded_forward", "sharded_generate", "sharded_param_shapes",
]
