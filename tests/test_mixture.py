"""Data mixtures and corpus preparation: formats, proportions, hosts, resume, wrap-around,
crash-safe preparation, one clear sentence per bad input, and a run that reports per source."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from configs import default
from llama_jax import train_loop
from llama_jax.data import mixture, pipeline, prepare, sources
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import ConfigError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = [
    ''.join(np.random.default_rng(n).choice(list('abcdefghijklmnopqrstuvwxyz'), 3 + n % 6))
    for n in range(300)
]


def texts(tag, count, seed=0):
  """`count` documents whose first word names their source and number."""
  rng = np.random.default_rng(seed)
  return [
      f'{tag}{i} ' + ' '.join(rng.choice(WORDS, int(rng.integers(5, 60)))) for i in range(count)
  ]


def write_jsonl(path, documents, opener=open, field='text'):
  with opener(path, 'wt') as f:
    for text in documents:
      f.write(json.dumps({field: text, 'meta': 1}) + '\n')


def jsonl_bytes(documents):
  return ''.join(json.dumps({'text': t}) + '\n' for t in documents).encode()


def write_zst(path, documents):
  path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(documents)))


def write_parquet(path, documents):
  pq.write_table(pa.table({'text': documents, 'id': list(range(len(documents)))}), path)


def records(folder, split):
  """Every record of one split of a prepared folder, by output file."""
  from array_record.python import array_record_data_source
  found = {}
  for path in sorted((folder / split).glob('*.array_record')):
    source = array_record_data_source.ArrayRecordDataSource([str(path)])
    found[path.name] = [source[i].decode() for i in range(len(source))]
  return found


def data_config(data_dir, **mixture_weights):
  config = default.get_config().data
  config.data_dir = str(data_dir)
  config.mixture = {
      name: {
          'dataset': f'prepared:{name}',
          'weight': weight
      } for name, weight in mixture_weights.items()
  }
  return config


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Three prepared sources a (300 documents), b (120) and c (12) under one data dir."""
  root = tmp_path_factory.mktemp('corpora')
  data_dir = tmp_path_factory.mktemp('data')
  for tag, count, shards in (('a', 300, 3), ('b', 120, 2), ('c', 12, 1)):
    folder = root / tag
    folder.mkdir()
    documents = texts(tag, count, seed=ord(tag))
    for shard in range(shards):
      write_jsonl(folder / f'part{shard}.jsonl', documents[shard::shards])
    prepare.prepare(str(folder), str(data_dir / tag))
  return data_dir


def test_every_format_is_read_and_split_stably(tmp_path):
  corpus = tmp_path / 'corpus'
  (corpus / 'sub').mkdir(parents=True)
  expected = []
  for name, writer in (('a.jsonl', write_jsonl), ('b.jsonl.gz',
                                                  lambda p, d: write_jsonl(p, d, opener=gzip.open)),
                       ('sub/c.jsonl.zst', write_zst), ('d.parquet', write_parquet)):
    documents = texts(name.split('.')[0].replace('sub/', ''), 60, seed=len(name))
    writer(corpus / name, documents)
    expected += documents
  (corpus / 'e.txt').write_text('a whole file is one document\nof two lines')
  expected.append('a whole file is one document\nof two lines')
  (corpus / 'ignored.csv').write_text('not a corpus format')
  before = {p: p.read_bytes() for p in corpus.rglob('*') if p.is_file()}

  totals = prepare.prepare(str(corpus), str(tmp_path / 'out'), workers=2)
  assert totals['documents'] == len(expected) and totals['files'] == 5
  train, validation = records(tmp_path / 'out', 'train'), records(tmp_path / 'out', 'validation')
  got = [t for texts_ in (*train.values(), *validation.values()) for t in texts_]
  assert sorted(got) == sorted(expected)
  assert 'sub__c.jsonl.zst.array_record' in train  # nested paths keep their name
  held_out = [t for texts_ in validation.values() for t in texts_]
  assert 0 < len(held_out) < len(expected) / 10  # about 1 in 50
  # The split is a function of the text: preparing again puts every document on the same side.
  prepare.prepare(str(corpus), str(tmp_path / 'again'))
  assert records(tmp_path / 'again', 'validation') == validation
  assert {p: p.read_bytes() for p in corpus.rglob('*') if p.is_file()} == before  # only read


def test_realized_proportions_follow_the_weights(prepared):
  config = data_config(prepared, a=5, b=3, c=2)
  corpus = mixture.open_corpus(config)
  counts, draws, rows = np.zeros(3), 2000, 4
  for row in range(rows):
    stream = mixture.row_documents(corpus.train, corpus.weights, row=row, batch_size=rows, seed=0,
                                   shuffle=True)
    for i in range(draws):
      source, _, text = stream[i]
      assert text.startswith('abc'[source])
      counts[source] += 1
  n, p = counts.sum(), np.array([0.5, 0.3, 0.2])
  tolerance = 4 * np.sqrt(n * p * (1 - p))  # 4 binomial standard deviations
  assert np.all(np.abs(counts - n * p) <= tolerance), (counts, n * p)


@pytest.fixture(scope='module')
def corpus(prepared):
  return mixture.open_corpus(data_config(prepared, a=5, b=3, c=2))


@pytest.fixture(scope='module')
def tokenizer(corpus, prepared):
  documents = [source[i] for source in corpus.train for i in range(len(source))]
  return tokenizer_lib.train(documents, 400, str(prepared / 'tokenizer.model'))


def mixed_batches(corpus, tokenizer, rows, batch_size=8, progress=None):
  return pipeline.batches(corpus.train, corpus.weights, tokenizer=tokenizer, batch_size=batch_size,
                          rows=rows, seq_len=64, seed=1, prefetch=2, progress=progress)


def test_the_global_batch_is_the_same_on_1_and_4_hosts(corpus, tokenizer):
  whole = iter(mixed_batches(corpus, tokenizer, range(8)))
  hosts = [iter(mixed_batches(corpus, tokenizer, range(2 * h, 2 * h + 2))) for h in range(4)]
  for _ in range(6):
    want, parts = next(whole), [next(host) for host in hosts]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


def test_resume_mid_epoch_gives_the_uninterrupted_stream(corpus, tokenizer):
  uninterrupted = iter(mixed_batches(corpus, tokenizer, range(8)))
  want = [next(uninterrupted) for _ in range(12)][7:]
  first = iter(mixed_batches(corpus, tokenizer, range(8)))
  for _ in range(7):
    next(first)
  state = json.loads(json.dumps(pipeline.row_states(first)))  # through a checkpoint
  resumed = iter(mixed_batches(corpus, tokenizer, range(8)))
  pipeline.set_row_states(resumed, state)
  for batch in want:
    got = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key])


def test_a_source_that_runs_out_starts_a_new_epoch_with_a_new_shuffle(corpus):
  small = corpus.train[2]  # 12 documents (fewer in train: some are held out)
  stream = mixture.row_documents([small], [1.0], row=0, batch_size=1, seed=0, shuffle=True)
  n = len(small)
  first, second = [stream[i][2] for i in range(n)], [stream[i][2] for i in range(n, 2 * n)]
  assert sorted(first) == sorted(second) == sorted(small[i] for i in range(n))
  assert first != second
  assert [stream[i][1] // n for i in (0, n - 1, n, 2 * n - 1)] == [0, 0, 1, 1]


def test_progress_counts_the_epochs_read(corpus, tokenizer):
  progress = pipeline.Progress([len(d) for d in corpus.train])
  iterator = iter(mixed_batches(corpus, tokenizer, range(8), progress=progress))
  for _ in range(40):
    next(iterator)
  epochs = progress.epochs()
  assert epochs[2] > 1 and epochs[0] < epochs[2]  # the small source has wrapped, `a` has not


def snapshot(folder):
  return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob('*') if p.is_file()}


@pytest.mark.slow
def test_preparation_killed_halfway_then_rerun_equals_an_uninterrupted_one(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(120):
    write_jsonl(corpus / f'shard{i:03d}.jsonl', texts(f's{i}_', 300, seed=i))
  prepare.prepare(str(corpus), str(tmp_path / 'straight'))
  command = [
      sys.executable, '-m', 'llama_jax.data.prepare', f'--input={corpus}',
      f'--output={tmp_path / "killed"}'
  ]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  done = tmp_path / 'killed' / 'done'
  deadline = time.time() + 300
  while not (done.is_dir() and len(list(done.glob('*.json'))) >= 10):
    assert time.time() < deadline and process.poll() is None, 'finished before it was killed'
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert len(list(done.glob('*.json'))) < 120  # it really stopped halfway
  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-2000:]
  assert 'already done' in rerun.stdout
  for split in prepare.SPLITS:
    assert records(tmp_path / 'killed', split) == records(tmp_path / 'straight', split)
  assert not list((tmp_path / 'killed').rglob('*.partial'))


def test_a_file_killed_between_its_renames_is_redone(tmp_path):
  """A kill after a file's train output was renamed but before its done marker (the window
  the test above hits only sometimes) leaves an output without a marker: the rerun redoes
  that file over it."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(3):
    write_jsonl(corpus / f'shard{i}.jsonl', texts(f's{i}_', 200, seed=i))
  prepare.prepare(str(corpus), str(tmp_path / 'straight'))
  prepare.prepare(str(corpus), str(tmp_path / 'killed'))
  (tmp_path / 'killed' / 'done' / 'shard1.jsonl.json').unlink()
  (tmp_path / 'killed' / 'validation' / 'shard1.jsonl.array_record').unlink()
  totals = prepare.prepare(str(corpus), str(tmp_path / 'killed'))
  assert (totals['files'], totals['skipped']) == (1, 2)
  for split in prepare.SPLITS:
    assert records(tmp_path / 'killed', split) == records(tmp_path / 'straight', split)
  assert not list((tmp_path / 'killed').rglob('*.partial'))


def test_a_prepared_folder_is_under_the_data_dir_unless_absolute(tmp_path):
  assert sources.prepared_folder('prepared:a', str(tmp_path)) == tmp_path / 'a'
  assert sources.prepared_folder(f'prepared:{tmp_path}/b', '/elsewhere') == tmp_path / 'b'


def test_bad_inputs_are_one_sentence_naming_the_source_or_file(prepared, tmp_path):
  with pytest.raises(ConfigError, match=r'data.mixture.b.weight is -1; give a positive number'):
    mixture.sources_of(data_config(prepared, a=1, b=-1))
  with pytest.raises(ConfigError, match=r"data.mixture.a.weight is 'heavy'"):
    mixture.sources_of(data_config(prepared, a='heavy'))
  with pytest.raises(
      UserError, match=r'missing holds no prepared train files; run `python -m '
      'llama_jax.data.prepare'):
    mixture.open_corpus(data_config(prepared, a=1, missing=1))
  with pytest.raises(UserError, match='is not a folder'):
    prepare.prepare(str(tmp_path / 'nowhere'), str(tmp_path / 'out'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='holds no .txt, .jsonl'):
    prepare.prepare(str(tmp_path / 'empty'), str(tmp_path / 'out'))

  good = texts('g', 50)
  cases = {
      'bad.jsonl.gz': lambda p: p.write_bytes(gzip.compress(jsonl_bytes(good))[:300]),
      'bad.jsonl.zst': lambda p: p.write_bytes(b'\x28\xb5\x2f\xfd' + b'garbage' * 20),
      'bad.parquet': lambda p: p.write_bytes(b'PAR1' + b'not parquet' * 20),
      'notext.jsonl': lambda p: write_jsonl(p, good, field='content'),
  }
  for name, write in cases.items():
    corpus = tmp_path / name.replace('.', '_')
    corpus.mkdir()
    write_jsonl(corpus / 'fine.jsonl', good)
    write(corpus / name)
    before = snapshot(corpus)
    output = tmp_path / f'{name}.out'
    with pytest.raises(UserError) as error:
      prepare.prepare(str(corpus), str(output))
    message = str(error.value)
    assert str(corpus / name) in message, message
    if name == 'notext.jsonl':
      assert f'{corpus / name}:1 has no text field' in message
    assert snapshot(corpus) == before  # the input is never touched
    assert not list(output.rglob('*.partial'))


@pytest.mark.slow
def test_a_mixed_run_logs_each_sources_loss_and_epochs(prepared, small_config, tmp_path,
                                                       metrics_rows):
  config = small_config(str(tmp_path / 'unused'), str(prepared), **{
      'train.steps': 4,
      'train.eval_every': 4,
      'train.eval_batches': 1
  })
  config.data.mixture = data_config(prepared, a=5, b=3, c=2).mixture
  last = train_loop.train(config, str(tmp_path / 'run'))
  corpus = mixture.open_corpus(config.data)
  held_out = [s.name for s, d in zip(corpus.sources, corpus.eval) if d is not None]
  assert {'a', 'b'} <= set(held_out)  # c's 12 documents may leave none for validation
  assert {'eval_loss', *(f'eval_loss/{name}' for name in held_out)} <= set(last)
  assert all(f'eval_loss/{name}' not in last for name in 'abc' if name not in held_out)
  rows = metrics_rows(tmp_path / 'run')
  trained = [row for row in rows if 'loss' in row][-1]  # (validation rows come separately)
  assert all(f'data/epochs/{name}' in trained for name in 'abc'), trained
