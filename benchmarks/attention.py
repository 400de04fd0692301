"""Forward + backward time of each attention implementation at one shape.

  python benchmarks/attention.py [--batch=8 --seq=256 --heads=8 --kv_heads=8 \
      --head_dim=64 --dtype=bfloat16 --implementations=reference,dot_product,blockwise]

Prints milliseconds per call of the forward pass and of the gradient with respect to q,
k and v (compile excluded), on the default JAX backend. `auto` picks from these numbers.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from absl import app, flags

from llama_jax import attention as attention_lib

flags.DEFINE_integer('batch', 8, 'Sequences.')
flags.DEFINE_integer('seq', 256, 'Sequence length.')
flags.DEFINE_integer('heads', 8, 'Query heads.')
flags.DEFINE_integer('kv_heads', 8, 'Key/value heads.')
flags.DEFINE_integer('head_dim', 64, 'Features per head.')
flags.DEFINE_string('dtype', 'bfloat16', 'float32 or bfloat16.')
flags.DEFINE_list('implementations', ['reference', 'dot_product', 'blockwise'],
                  'Implementations to time (splash: TPU only).')
flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement.')
FLAGS = flags.FLAGS


def milliseconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  start = time.perf_counter()
  for _ in range(FLAGS.repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / FLAGS.repeats * 1e3


def main(argv):
  del argv
  keys = jax.random.split(jax.random.key(0), 3)
  dtype = jnp.dtype(FLAGS.dtype)
  q = jax.random.normal(keys[0], (FLAGS.batch, FLAGS.seq, FLAGS.heads, FLAGS.head_dim), dtype)
  k, v = (jax.random.normal(key, (FLAGS.batch, FLAGS.seq, FLAGS.kv_heads, FLAGS.head_dim), dtype)
          for key in keys[1:])
  print(f'{jax.devices()[0].device_kind}: batch {FLAGS.batch}, seq {FLAGS.seq}, heads '
        f'{FLAGS.heads}/{FLAGS.kv_heads}, head_dim {FLAGS.head_dim}, {FLAGS.dtype}')
  for name in FLAGS.implementations:
    loss = lambda q, k, v, name=name: jnp.sum(
        attention_lib.attention(q, k, v, implementation=name).astype(jnp.float32) ** 2)
    forward = milliseconds(jax.jit(loss), q, k, v)
    backward = milliseconds(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v)
    print(f'{name:12s} forward {forward:8.2f} ms   forward+backward {backward:8.2f} ms')


if __name__ == '__main__':
  app.run(main)
