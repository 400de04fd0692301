"""Input-pipeline throughput: `python -m benchmarks.data_pipeline [--seq_len=2048] [--sources=3]`.

Prints the tokens per second that the packed, shuffled pipeline delivers on this host for
the built-in corpus (the Python standard library) with the tiny config's tokenizer; with
--sources=N the corpus is read as N sources mixed with weights N, N-1, ..., 1.
"""

import time

from absl import app, flags, logging

from configs import tiny
from llama_jax.data import mixture, pipeline
from llama_jax.data import tokenizer as tokenizer_lib

flags.DEFINE_integer('seq_len', 2048, 'Tokens per sequence.')
flags.DEFINE_integer('batch_size', 16, 'Sequences per batch.')
flags.DEFINE_integer('batches', 200, 'Batches timed (after 5 warm-up batches).')
flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'TFDS data dir.')
flags.DEFINE_integer('sources', 1, 'Sources in the mixture (the same corpus N times).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = tiny.get_config()
  config.data.data_dir = FLAGS.data_dir
  if FLAGS.sources > 1:
    config.data.mixture = {
        f'source{i}': {
            'dataset': config.data.name,
            'weight': FLAGS.sources - i
        } for i in range(FLAGS.sources)
    }
  corpus = mixture.open_corpus(config.data)
  tokenizer = tokenizer_lib.for_data(config.data, config.model.vocab_size, corpus)
  dataset = pipeline.batches(corpus.train, corpus.weights, tokenizer=tokenizer,
                             batch_size=FLAGS.batch_size, rows=range(FLAGS.batch_size),
                             seq_len=FLAGS.seq_len, seed=0, prefetch=config.data.prefetch)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(iterator)
  seconds = time.perf_counter() - start
  tokens = FLAGS.batches * FLAGS.batch_size * FLAGS.seq_len
  print(f'{tokens / seconds:,.0f} tokens/s ({FLAGS.batches / seconds:.1f} batches/s of '
        f'{FLAGS.batch_size} x {FLAGS.seq_len}) from {len(corpus.sources)} source(s)')


if __name__ == '__main__':
  app.run(main)
