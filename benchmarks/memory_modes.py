"""docs/memory.md's memory modes, by name, for benchmarks.fit_table and the capacity section
of benchmarks.accelerator_report."""

# docs/memory.md's modes, from the least data movement and rounding to the most: config
# overrides, and the bytes per parameter on the device (weights, Adam moments, master copy,
# gradients) and in host memory.
MODES = {
    'float32': ({}, 16, 0),
    'bf16 state': ({
        'optim.state_dtype': 'bfloat16'
    }, 12, 0),
    'bf16 weights + host master': ({
        'train.param_dtype': 'bfloat16',
        'optim.state_dtype': 'bfloat16',
        'optim.master_memory': 'host'
    }, 8, 4),
    'bf16 weights + no master': ({
        'train.param_dtype': 'bfloat16',
        'optim.state_dtype': 'bfloat16',
        'optim.master_memory': 'none'
    }, 8, 0),
    'bf16 weights + host state + host master': ({
        'train.param_dtype': 'bfloat16',
        'optim.state_memory': 'host',
        'optim.master_memory': 'host'
    }, 4, 12),
    'bf16 weights + host state + host master + remat offload': ({
        'train.param_dtype': 'bfloat16',
        'optim.state_memory': 'host',
        'optim.master_memory': 'host',
        'model.remat': 'offload'
    }, 4, 12),
}


def apply(config, mode: str):
  """`config` with mode `mode`'s keys set (in place; returned)."""
  for key, value in MODES[mode][0].items():
    group, field = key.split('.')
    config[group][field] = value
  return config
