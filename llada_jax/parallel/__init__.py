"""Scale-out: device meshes, logical-axis sharding rules, shard_map expert parallelism for the MoE,
sharded forward/decode helpers and multi-host start-up.

Typical use:

    logits = llada_jax.forward(params, config, input_ids, block_length=32,
                               mesh="data=2,expert=4")   # or "auto", or a Mesh
    result = llada_jax.generate(params, config, prompts, mesh="auto")

`moe_impl="ep"` (dense all_to_all, any backend) or `"ep_ragged"` (ragged_all_to_all, TPU) runs
the MoE experts expert-parallel inside `jax.shard_map`; it needs a mesh in context
(`jax.set_mesh`), which `forward`/`generate` set when given a mesh.
"""

from llada_jax.parallel.expert_parallel import EPConfig, capacity, expert_parallel_moe, register_ep
from llada_jax.parallel.memory import Workload
from llada_jax.parallel.mesh import (AXES, default_parallel_config, format_mesh_shape,
                                     load_parallel_config, make_abstract_mesh, make_mesh,
                                     mesh_from_config, mesh_shape, parallel_config,
                                     parse_mesh_spec, resolve_mesh_shape)
from llada_jax.parallel.rules import (ACTIVATION_AXES, DEFAULT_RULES, activation_sharding,
                                      activation_spec, logical_to_spec, normalize_rules,
                                      opt_state_shardings, param_bytes_per_device,
                                      param_partition_specs, param_shardings, per_device_bytes,
                                      put, shard_params, sharded_param_shapes, to_host)
from llada_jax.parallel.sharded import (auto_mesh_shape, device_memory_bytes, fake_cpu_devices,
                                        mesh_context, mesh_for_checkpoint,
                                        resolve_mesh, resolve_moe_impl, sharded_forward,
                                        sharded_generate)

__all__ = [
    "ACTIVATION_AXES", "AXES", "Workload", "auto_mesh_shape", "device_memory_bytes", "fake_cpu_devices", "mesh_context", "mesh_for_checkpoint",
    "resolve_mesh", "resolve_moe_impl", "DEFAULT_RULES", "EPConfig", "activation_sharding",
    "activation_spec", "capacity", "default_parallel_config", "expert_parallel_moe",
    "format_mesh_shape", "load_parallel_config", "logical_to_spec", "make_abstract_mesh",
    "make_mesh",
    "mesh_from_config", "mesh_shape", "normalize_rules", "opt_state_shardings",
    "parallel_config", "param_bytes_per_device", "param_partition_specs", "param_shardings",
    "parse_mesh_spec", "per_device_bytes", "put", "register_ep", "resolve_mesh_shape",
    "shard_params", "sharded_forward", "sharded_generate", "sharded_param_shapes", "to_host",
]
