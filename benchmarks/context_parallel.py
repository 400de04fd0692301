"""Attention work per chip under context parallelism, from the splash kernel's own block map.

  python -m benchmarks.context_parallel [--lengths=32768,131072 --shards=4,8 --block=512 \
      --heads=32 --head_dim=128]

Splash computes a (query block, key block) pair unless its mask says the pair is masked;
`process_mask` is what the kernel reads. For each length and `sequence` size N this prints
the pairs (and the forward FLOPs, 4 x block^2 x head_dim per head and pair) each chip
computes: before, every chip attends the whole sequence; now (load-balanced layout,
q_seq_shards=N), each chip its own queries. Runs on a CPU in seconds; no TPU needed.
"""

import numpy as np
from absl import app, flags
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info

from llama_jax import context_parallel

FLAGS = flags.FLAGS


def pairs_per_chip(mask, shards: int, block: int) -> np.ndarray:
  """Computed (query block, key block) pairs of each of the `shards` query slices."""
  mask_info, _ = info.process_mask(masks.MultiHeadMask([mask]), (block, block), q_seq_shards=shards)
  computed = np.asarray(mask_info.block_mask)[0] > 0  # [query blocks, key blocks]
  return computed.reshape(shards, -1, computed.shape[-1]).sum(axis=(1, 2))


def main(argv):
  del argv
  lengths = [int(x) for x in FLAGS.lengths.split(',')]
  shard_counts = [int(x) for x in FLAGS.shards.split(',')]
  pair_flops = 4 * FLAGS.block**2 * FLAGS.head_dim * FLAGS.heads
  print('| length | sequence N | before: pairs per chip | now: pairs per chip (min-max) '
        '| now / before | forward TFLOPs per chip, layer and sequence: before -> now |')
  print('| --- | --- | --- | --- | --- | --- |')
  for length in lengths:
    whole = int(pairs_per_chip(masks.CausalMask((length, length)), 1, FLAGS.block)[0])
    for shards in shard_counts:
      mask = context_parallel._load_balanced_causal_mask(length, shards)
      now = pairs_per_chip(mask, shards, FLAGS.block)
      print(f'| {length} | {shards} | {whole:,} | {now.min():,}-{now.max():,} | '
            f'{now.max() / whole:.4f} (1/N = {1 / shards:.4f}) | '
            f'{whole * pair_flops / 1e12:.2f} -> {now.max() * pair_flops / 1e12:.2f} |')


if __name__ == '__main__':
  flags.DEFINE_string('lengths', '32768,131072', 'Sequence lengths, comma-separated.')
  flags.DEFINE_string('shards', '4,8', 'Sizes of the sequence mesh axis, comma-separated.')
  flags.DEFINE_integer('block', 512, "Splash's query and key block.")
  flags.DEFINE_integer('heads', 32, 'Query heads (7B: 32).')
  flags.DEFINE_integer('head_dim', 128, 'Head dimension (7B: 128).')
  app.run(main)
