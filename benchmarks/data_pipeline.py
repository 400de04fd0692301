"""Input-pipeline throughput: `python -m benchmarks.data_pipeline [--seq_len=2048] [--sources=3]`.

Prints the tokens per second that the packed, shuffled pipeline delivers on this host for
the built-in corpus (the Python standard library), once with the tiny config's
sentencepiece tokenizer and once with a Hugging Face tokenizer.json: --tokenizer_json=PATH,
or by default a byte-level BPE of --json_vocab tokens (128k, Llama 3's size, split pattern
and special tokens) trained here on the corpus (also read upper-cased and reversed, for
enough distinct words) with the `tokenizers` trainer, then written as tiktoken ranks and
converted back by transformers' TikTokenConverter (the way Llama 3's tokenizer.json was made
from Meta's file), both kept in DATA_DIR/tokenizers/.
With --sources=N the corpus is read as N sources mixed with weights N, N-1, ..., 1.
"""

import base64
import json
import os
import tempfile
import time

import tokenizers
from absl import app, flags, logging
from etils import epath
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

from configs import tiny
from llama_jax.data import mixture, pipeline
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.data.tokenizers import tiktoken_model

flags.DEFINE_integer('seq_len', 2048, 'Tokens per sequence.')
flags.DEFINE_integer('batch_size', 16, 'Sequences per batch.')
flags.DEFINE_integer('batches', 200, 'Batches timed (after 5 warm-up batches).')
flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'TFDS data dir.')
flags.DEFINE_integer('sources', 1, 'Sources in the mixture (the same corpus N times).')
flags.DEFINE_string('tokenizer_json', '', 'A tokenizer.json to time; empty: one trained here.')
flags.DEFINE_integer('json_vocab', 128_000, 'BPE tokens of the tokenizer.json trained here.')
FLAGS = flags.FLAGS


def train_tokenizer_json(documents, vocab_size: int, path: epath.Path) -> None:
  """A Llama-3-like tokenizer.json: byte-level BPE after Llama 3's split pattern, then its
  256 special tokens."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(tiktoken_model.PATTERN), 'isolated'),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  ])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(documents, trainer)
  tokenizer.add_special_tokens(list(tiktoken_model.SPECIAL_TOKENS))
  path.parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(os.fspath(path))


def convert_like_llama3(trained: epath.Path, path: epath.Path) -> None:
  """The trained tokenizer.json's vocabulary as tiktoken ranks, made a tokenizer.json again
  by transformers' TikTokenConverter (every split of every token a merge, by rank)."""
  vocab = json.loads(trained.read_text())['model']['vocab']
  byte_of = {c: b for b, c in bytes_to_unicode().items()}
  with tempfile.NamedTemporaryFile('w', suffix='.tiktoken') as ranks:
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
      ranks.write(f'{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}\n')
    ranks.flush()
    converter = TikTokenConverter(vocab_file=ranks.name, pattern=tiktoken_model.PATTERN,
                                  extra_special_tokens=list(tiktoken_model.SPECIAL_TOKENS))
    converter.converted().save(os.fspath(path))


def tokens_per_second(corpus, tokenizer, prefetch: int) -> tuple[float, float, float]:
  """Tokens per second, batches per second, tokens per CPU-second of this process (all its
  threads: what the pipeline costs, whatever else runs on the machine)."""
  dataset = pipeline.batches(corpus.train, corpus.weights, tokenizer=tokenizer,
                             batch_size=FLAGS.batch_size, rows=range(FLAGS.batch_size),
                             seq_len=FLAGS.seq_len, seed=0, prefetch=prefetch)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(FLAGS.batches):
    next(iterator)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  tokens = FLAGS.batches * FLAGS.batch_size * FLAGS.seq_len
  return tokens / seconds, FLAGS.batches / seconds, tokens / cpu_seconds


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
  json_path = FLAGS.tokenizer_json
  if not json_path:
    path = epath.Path(os.path.expanduser(FLAGS.data_dir)) / 'tokenizers' / (
        f'{mixture.cache_name(config.data)}_bpe{FLAGS.json_vocab}.json')
    if not path.exists():
      print(f'Training a {FLAGS.json_vocab}-token byte-level BPE into {path}')
      train = corpus.train[0]
      # The standard library alone has words for about 79k merges: the trainer also reads
      # each file upper-cased and reversed, so that the vocabulary reaches 128k like Llama
      # 3's (most of whose tokens a Python corpus never uses either).
      texts = (
          text for i in range(len(train)) for text in (train[i], train[i].upper(), train[i][::-1]))
      train_tokenizer_json(texts, FLAGS.json_vocab, path)
    converted = path.with_name(path.stem + '_from_tiktoken.json')
    if not converted.exists():
      convert_like_llama3(path, converted)
    json_path = os.fspath(converted)
  tokenizers_timed = [
      ('sentencepiece (tiny config)',
       tokenizer_lib.for_data(config.data, config.model.vocab_size, corpus)),
      (f'tokenizer.json {json_path}', tokenizer_lib.load(json_path)),
  ]
  print(
      f'tokenizer.json encoded by {"tiktoken" if tokenizers_timed[1][1].tiktoken else "tokenizers"}'
      ' (tokenizer_json.tiktoken_ranks)')
  for name, tokenizer in tokenizers_timed:
    tokens, batches, per_cpu_second = tokens_per_second(corpus, tokenizer, config.data.prefetch)
    print(f'{name}, {tokenizer.vocab_size:,} tokens: {tokens:,.0f} tokens/s ({batches:.1f} '
          f'batches/s of {FLAGS.batch_size} x {FLAGS.seq_len}) from {len(corpus.sources)} '
          f'source(s); {per_cpu_second:,.0f} tokens per CPU-second; load average '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')


if __name__ == '__main__':
  app.run(main)
