"""Forward and forward+backward time and memory of each attention implementation.

  python -m benchmarks.attention [--seqs=2048,8192,32768 --tokens=65536 --heads=32 \
      --kv_heads=8 --head_dim=128 --dtype=bfloat16 --packed --implementations=...]

For each sequence length (batch = tokens / length), on the default JAX backend: ms per
call of the forward pass and of the gradient with respect to q, k and v (compile
excluded), and the temporary memory XLA allocates for the gradient. --packed gives every
row several documents (segment ids). By default every implementation the platform can run
at that shape; one that fails (out of memory, say) is reported and skipped.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llama_jax import attention as attention_lib

FLAGS = flags.FLAGS


def milliseconds(compiled, *args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))  # warm up
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def packed_segment_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
  """[batch, length] ids of documents 64 to length/2 tokens long, starting anywhere."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    while start < length:
      size = int(rng.integers(64, max(65, length // 2)))
      ids[row, start:start + size] = segment
      start, segment = start + size, segment + 1
  return ids


def measure(implementation: str, batch: int, length: int, heads: int, kv_heads: int, head_dim: int,
            dtype, packed: bool, repeats: int = 5) -> dict:
  """{'forward_ms', 'backward_ms' (forward+backward), 'temp_bytes' (of the gradient)}."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), dtype) for key in keys[1:])
  segments = jnp.asarray(packed_segment_ids(batch, length)) if packed else None

  def loss(q, k, v):
    out = attention_lib.attention(q, k, v, segments, segments, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32)**2)

  forward = jax.jit(loss).lower(q, k, v).compile()
  backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  return {
      'forward_ms': milliseconds(forward, q, k, v, repeats=repeats),
      'backward_ms': milliseconds(backward, q, k, v, repeats=repeats),
      'temp_bytes': backward.memory_analysis().temp_size_in_bytes
  }


def supported(length: int, head_dim: int, dtype, packed: bool) -> list[str]:
  platform = jax.default_backend()
  return [
      name for name in attention_lib.IMPLEMENTATIONS[1:]
      if not attention_lib.unsupported(name, platform=platform, length=length, head_dim=head_dim,
                                       dtype=dtype, segments=packed) and
      not (platform == 'cpu' and name in ('splash', 'triton'))
  ]  # interpreted: slow


def main(argv):
  del argv
  dtype = jnp.dtype(FLAGS.dtype)
  print(f'{jax.devices()[0].device_kind}: {FLAGS.tokens} tokens per call, heads '
        f'{FLAGS.heads}/{FLAGS.kv_heads}, head_dim {FLAGS.head_dim}, {FLAGS.dtype}, '
        f'{"packed documents" if FLAGS.packed else "one document per row"}')
  print('| seq | batch | implementation | forward ms | forward+backward ms | backward temp GiB |')
  print('| --- | --- | --- | --- | --- | --- |')
  for length in map(int, FLAGS.seqs):
    batch = max(1, FLAGS.tokens // length)
    for name in FLAGS.implementations or supported(length, FLAGS.head_dim, dtype, FLAGS.packed):
      try:
        row = measure(name, batch, length, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, dtype,
                      FLAGS.packed, FLAGS.repeats)
      except Exception as error:  # out of memory, an unsupported shape: report and go on
        print(
            f'| {length} | {batch} | {name} | failed: {type(error).__name__}: '
            f'{str(error).splitlines()[0][:120]} | | |', flush=True)
        continue
      print(
          f'| {length} | {batch} | {name} | {row["forward_ms"]:.2f} | '
          f'{row["backward_ms"]:.2f} | {row["temp_bytes"] / 2**30:.2f} |', flush=True)


if __name__ == '__main__':
  flags.DEFINE_list('seqs', ['2048'], 'Sequence lengths.')
  flags.DEFINE_integer('tokens', 16384, 'Tokens per call: batch = tokens / length (at least 1).')
  flags.DEFINE_integer('heads', 8, 'Query heads.')
  flags.DEFINE_integer('kv_heads', 8, 'Key/value heads.')
  flags.DEFINE_integer('head_dim', 64, 'Features per head.')
  flags.DEFINE_string('dtype', 'bfloat16', 'float32, bfloat16 or float16.')
  flags.DEFINE_bool('packed', True, 'Several documents per row (segment ids).')
  flags.DEFINE_list('implementations', [], 'Default: every one the platform supports.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement.')
  app.run(main)
