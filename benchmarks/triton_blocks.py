"""Which block sizes of the Pallas GPU attention kernel compile for a GPU, per head_dim.

  python -m benchmarks.triton_blocks [--topology=h100-1] [--seq_len=2048]

Compiles the kernel's forward and backward (jax.grad through `mha`) for one GPU of the
topology (compile-only, `pip install -e '.[gpu-aot]'`) over the block sizes it accepts and
prints which compile: Triton refuses a block whose tiles do not fit the GPU's shared memory.
It says nothing about speed (that needs a GPU); llama_jax/attention.py takes the largest
that compile.
"""

import itertools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from llama_jax import aot

FLAGS = flags.FLAGS
FORWARD = (256, 128, 64, 32)
BACKWARD = (128, 64, 32, 16)


def compiles(device, head_dim, seq_len, forward, backward) -> str:
  """'ok' or the first line of the compiler's refusal."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  sizes = gpu_attention.BlockSizes(block_q=forward, block_k=forward, block_q_dkv=backward,
                                   block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)
  heads = 2048 // head_dim

  def loss(q, k, v):
    out = gpu_attention.mha(q, k, v, None, sm_scale=head_dim**-0.5, causal=True, block_sizes=sizes)
    return jnp.sum(out.astype(jnp.float32))

  sharding = jax.sharding.SingleDeviceSharding(device)
  shape = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.bfloat16, sharding=sharding)
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return 'ok'
  except Exception as error:  # Triton's or XLA's refusal
    lines = [line for line in str(error).splitlines() if line.strip()]
    return next(
        (line for line in lines if 'shared memory' in line.lower() or 'resource' in line.lower()),
        lines[0] if lines else type(error).__name__)[:160]


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')
  _, devices = aot.topology_devices(FLAGS.topology)
  for head_dim in (64, 128):
    for forward, backward in itertools.product(FORWARD, BACKWARD):
      start = time.perf_counter()
      result = compiles(devices[0], head_dim, FLAGS.seq_len, forward, backward)
      print(
          f'{FLAGS.topology} head_dim {head_dim} forward {forward} backward {backward}: '
          f'{result} ({time.perf_counter() - start:.1f}s)', flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('topology', 'h100-1', 'A GPU topology (llama_jax.aot).')
  flags.DEFINE_integer('seq_len', 2048, 'Sequence length.')
  app.run(main)
