"""The input pipeline: the builtin TFDS dataset, tokenizer, packing, per-host rows, resume."""

import json
import os

import grain
import numpy as np
import pytest
from conftest import WORDS

from configs import default
from llama_jax.data import builtin_text, chat, pipeline, prepare, sources
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError


def data_config(**values):
  config = default.get_config().data
  config.update(values)
  return config


@pytest.fixture(scope='module')
def corpus(tmp_path_factory, write_corpus):
  text_dir = str(tmp_path_factory.mktemp('corpus'))
  write_corpus(text_dir)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = sources.dataset_builder('builtin_text', data_dir, text_dir)
  sources.prepare(builder)
  train = sources.documents('builtin_text', data_config(data_dir=data_dir, text_dir=text_dir),
                            'train')
  documents = [train[i] for i in range(len(train))]
  tokenizer = tokenizer_lib.train(documents, 400, os.path.join(data_dir, 'tok.model'))
  return dict(text_dir=text_dir, data_dir=data_dir, builder=builder, train=train,
              tokenizer=tokenizer, documents=documents)


def split_texts(builder, split):
  source = builder.as_data_source(split)
  return sorted(source[i]['text'].decode() for i in range(len(source)))


def test_builtin_splits_are_disjoint_stable_and_complete(corpus, tmp_path):
  builder = corpus['builder']
  train, validation = split_texts(builder, 'train'), split_texts(builder, 'validation')
  assert train and validation and not set(train) & set(validation)
  assert len(train) + len(validation) == 60 + 5  # 60 files, 5 jsonl lines, no test folder
  assert 'never read' not in train + validation
  rebuilt = sources.dataset_builder('builtin_text', str(tmp_path), corpus['text_dir'])
  sources.prepare(rebuilt)
  assert split_texts(rebuilt, 'train') == train
  assert split_texts(rebuilt, 'validation') == validation


def test_default_corpus_is_the_stdlib_without_tests():
  files = builtin_text.text_files(builtin_text.stdlib_dir())
  assert 'os.py' in files and 'json/decoder.py' in files
  assert not any(part in ('test', 'tests') for f in files for part in f.split(os.sep))


def test_tokenizer_round_trip(corpus):
  tokenizer = corpus['tokenizer']
  for text in ('naïve café 日本語 1999', 'def f(x):\n    return 42  # ✓ emoji 🙂'):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.vocab_size == 400
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
  digits = [tokenizer.processor.id_to_piece(t) for t in tokenizer.encode('1999')]
  assert all(len(piece.strip('▁')) <= 1 for piece in digits)  # split digits


def test_a_tokenizer_larger_than_the_model_is_a_clear_error(corpus):
  tokenizer_lib.check_vocab(corpus['tokenizer'], 32000, 'tok.model')  # fewer ids: fine
  with pytest.raises(
      UserError, match='has 400 tokens but model.vocab_size is 300; set '
      'model.vocab_size to at least 400'):
    tokenizer_lib.check_vocab(corpus['tokenizer'], 300, 'tok.model')


def test_missing_and_corrupt_tokenizer_files(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    tokenizer_lib.load(str(tmp_path / 'missing.model'))
  (tmp_path / 'bad.model').write_bytes(b'not a model')
  with pytest.raises(UserError, match='is none of the formats known'):
    tokenizer_lib.load(str(tmp_path / 'bad.model'))


def make_batches(corpus, rows, batch_size=4, seq_len=32, shuffle=True):
  return pipeline.batches([corpus['train']], [1.0], tokenizer=corpus['tokenizer'],
                          batch_size=batch_size, rows=rows, seq_len=seq_len, seed=3,
                          shuffle=shuffle, prefetch=2)


def test_packing_keeps_every_token_once_in_order(corpus):
  """Row r of an unshuffled pipeline holds documents r, r + B, ... in order."""
  tokenizer, documents = corpus['tokenizer'], corpus['documents']
  batch_size, seq_len, steps = 2, 32, 30
  iterator = iter(make_batches(corpus, range(batch_size), batch_size, seq_len, shuffle=False))
  batches = [next(iterator) for _ in range(steps)]
  for row in range(batch_size):
    expected = np.concatenate(
        [tokenizer_lib.encode_document(tokenizer, d) for d in documents[row::batch_size] * 3])
    # Each packed row holds seq_len + 1 tokens; inputs drop the last, targets the first.
    full = np.concatenate([np.append(b['inputs'][row], b['targets'][row][-1]) for b in batches])
    np.testing.assert_array_equal(full, expected[:len(full)])
    for b in batches:
      np.testing.assert_array_equal(b['targets'][row][:-1], b['inputs'][row][1:])


def test_segment_ids_positions_and_weights_at_boundaries(corpus):
  batch = next(iter(make_batches(corpus, range(4), seq_len=256)))
  bos = corpus['tokenizer'].bos_id
  boundaries = 0
  for row in range(4):
    inputs, segments = batch['inputs'][row], batch['segment_ids'][row]
    positions, weights = batch['positions'][row], batch['weights'][row]
    starts = np.flatnonzero(np.diff(segments)) + 1
    assert all(inputs[s] == bos for s in starts)  # a new segment starts with BOS
    assert all(positions[s] == 0 for s in starts) and positions[0] == 0
    for t in range(1, len(inputs)):
      if segments[t] == segments[t - 1]:
        assert positions[t] == positions[t - 1] + 1
    # A target outside its input's document is not learned.
    np.testing.assert_array_equal(weights[:-1], segments[1:] == segments[:-1])
    assert weights[starts - 1].sum() == 0
    boundaries += len(starts)
  assert boundaries > 0


@pytest.mark.parametrize('hosts', [2, 4])
def test_host_shards_union_is_the_global_batch(corpus, hosts):
  batch_size = 8
  whole = iter(make_batches(corpus, range(batch_size), batch_size))
  per_host = [
      iter(
          make_batches(corpus, range(h * batch_size // hosts, (h + 1) * batch_size // hosts),
                       batch_size)) for h in range(hosts)
  ]
  for _ in range(5):
    want = next(whole)
    parts = [next(it) for it in per_host]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


def test_resume_gives_the_batches_of_an_uninterrupted_run(corpus):
  uninterrupted = iter(make_batches(corpus, range(4)))
  want = [next(uninterrupted) for _ in range(10)][5:]
  first = iter(make_batches(corpus, range(4)))
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as it goes through a checkpoint
  resumed = iter(make_batches(corpus, range(4)))
  resumed.set_state(state)
  for batch in want:
    got = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key])


def test_epochs_reshuffle(corpus):
  documents = len(corpus['documents'])
  dataset = pipeline.batches([corpus['train']], [1.0], tokenizer=corpus['tokenizer'], batch_size=1,
                             rows=range(1), seq_len=4096, seed=0, prefetch=0)
  # One row, long sequences: the first token of each document appears in document order.
  bos = corpus['tokenizer'].bos_id
  iterator = iter(dataset)
  firsts = []
  while len(firsts) < 2 * documents:
    batch = next(iterator)
    tokens = np.append(batch['inputs'][0], batch['targets'][0][-1])
    starts = np.flatnonzero(tokens == bos)
    firsts += [tuple(tokens[s + 1:s + 4]) for s in starts if s + 4 <= len(tokens)]
  assert firsts[:documents // 2] != firsts[documents:documents + documents // 2]


def test_bad_inputs_are_one_clear_sentence(corpus, tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    sources.dataset_builder('c4/en:3.1.0', str(tmp_path / 'nowhere'))
  with pytest.raises(UserError, match='TFDS knows no dataset'):
    sources.dataset_builder('no_such_dataset_xyz', str(tmp_path))
  with pytest.raises(UserError, match='tfds build mnist'):
    sources.prepare(sources.dataset_builder('mnist', str(tmp_path)))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(UserError, match='holds no'):
    sources.prepare(sources.dataset_builder('builtin_text', str(tmp_path / 'd'), str(empty)))
  with pytest.raises(UserError, match='is not a folder'):
    sources.dataset_builder('builtin_text', str(tmp_path), str(tmp_path / 'missing'))
  with pytest.raises(UserError, match="no feature 'content'"):
    sources.open_split(corpus['builder'], 'train', 'content')
  with pytest.raises(UserError, match="no split 'test'"):
    sources.open_split(corpus['builder'], 'test', 'text')


def conversations(n, seed=0, long_every=0):
  """n JSON conversations of WORDS (1-2 exchanges, some with a system prompt); with
  long_every, every long_every-th has a long answer."""
  rng = np.random.default_rng(seed)
  words = lambda k: ' '.join(rng.choice(WORDS, k))  # noqa: E731
  found = []
  for i in range(n):
    messages = [{'role': 'system', 'content': words(2)}] if i % 3 == 0 else []
    for _ in range(1 + i % 2):
      messages += [{
          'role': 'user',
          'content': words(rng.integers(1, 4))
      }, {
          'role': 'assistant',
          'content': words(rng.integers(1, 5))
      }]
    if long_every and i % long_every == 1:
      messages[-1]['content'] = words(60)
    found.append(json.dumps({'messages': messages}))
  return found


def conversation_batches(documents, tokenizer, overlong='truncate', batch_size=2, seq_len=96,
                         progress=None):
  form = pipeline.Format(['chats'], ['messages'], 'llama2', overlong)
  return pipeline.batches([grain.MapDataset.source(documents)], [1.0], tokenizer=tokenizer,
                          batch_size=batch_size, rows=range(batch_size), seq_len=seq_len, seed=0,
                          shuffle=False, prefetch=0, progress=progress, form=form)


def segments_of(batch, row):
  """(input ids, target weights) of each packed document of a batch row, in order."""
  segments = batch['segment_ids'][row]
  return [(batch['inputs'][row][segments == s], batch['weights'][row][segments == s])
          for s in np.unique(segments[segments > 0])]


def rendered(tokenizer, document):
  return chat.render(tokenizer, json.loads(document)['messages'], template_name='llama2')


def test_packed_weights_are_one_exactly_on_assistant_tokens(corpus):
  """Each row packs whole conversations in order; a target weighs what chat.render gives
  its token, alone (the last token of a conversation predicts nothing)."""
  tokenizer, documents, batch_size, seq_len = corpus['tokenizer'], conversations(40), 2, 160
  assert max(len(rendered(tokenizer, d)[0]) for d in documents) <= seq_len + 1
  iterator = iter(conversation_batches(documents, tokenizer, batch_size=batch_size,
                                       seq_len=seq_len))
  seen = [[] for _ in range(batch_size)]
  for _ in range(8):
    batch = next(iterator)
    for row in range(batch_size):
      seen[row] += segments_of(batch, row)
      assert np.all(batch['weights'][row][batch['segment_ids'][row] == 0] == 0)  # padding
  for row in range(batch_size):
    assert len(seen[row]) > 8  # several conversations a row
    for (ids, weights), document in zip(seen[row], documents[row::batch_size]):
      expected_ids, expected_weights = rendered(tokenizer, document)
      n = len(ids)  # the whole conversation, or all but its last token (the row's last target)
      assert n in (len(expected_ids), len(expected_ids) - 1)
      np.testing.assert_array_equal(ids, expected_ids[:n])
      np.testing.assert_array_equal(weights, (expected_weights[1:] + [0])[:n])
      assert sum(weights) > 0


def test_overlong_conversations_are_truncated_or_dropped(corpus):
  tokenizer, seq_len = corpus['tokenizer'], 96
  documents = conversations(12, long_every=4)
  lengths = [len(rendered(tokenizer, d)[0]) for d in documents]
  long = [i for i, n in enumerate(lengths) if n > seq_len + 1]
  assert long == [1, 5, 9]
  for overlong in ('truncate', 'drop'):
    progress = pipeline.Progress([len(documents)])
    iterator = iter(
        conversation_batches(documents, tokenizer, overlong, batch_size=1, seq_len=seq_len,
                             progress=progress))
    seen = []
    while len(seen) < len(documents):
      seen += segments_of(next(iterator), 0)
    kept = [i for i in range(len(documents)) if overlong == 'truncate' or i not in long]
    for (ids, weights), i in zip(seen, kept):
      expected_ids, expected_weights = rendered(tokenizer, documents[i])
      n = min(len(ids), seq_len)
      if i in long:  # cut to a row; its kept answer tokens still learned
        assert len(ids) == seq_len
        np.testing.assert_array_equal(weights, expected_weights[1:seq_len + 1])
      np.testing.assert_array_equal(ids[:n], expected_ids[:n])
    read = progress.furthest[0] + 1  # the row has read ahead of `seen`
    assert progress.overlong == [sum(p % len(documents) in long for p in range(read))]


def test_bad_conversations_name_their_source(corpus):
  tokenizer = corpus['tokenizer']
  no_answer = json.dumps({'messages': [{'role': 'user', 'content': 'alpha'}]})
  with pytest.raises(UserError, match='source chats: a conversation has no assistant turn'):
    next(iter(conversation_batches([no_answer], tokenizer, batch_size=1)))
  with pytest.raises(UserError, match="source chats: unknown role 'robot'"):
    next(
        iter(
            conversation_batches([json.dumps({'messages': [{
                'role': 'robot',
                'content': 'x'
            }]})], tokenizer, batch_size=1)))
  with pytest.raises(UserError, match='source chats .* is not JSON'):
    next(iter(conversation_batches(['plain text'], tokenizer, batch_size=1)))
  with pytest.raises(UserError, match="data format 'chat'"):
    pipeline.Format(['chats'], ['chat'])


def test_prepare_keeps_conversations_as_json(tmp_path):
  (tmp_path / 'in').mkdir()
  records = [{'prompt': f'question {i}', 'completion': f'answer {i}', 'id': i} for i in range(40)]
  (tmp_path / 'in' / 'qa.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  prepare.prepare(str(tmp_path / 'in'), str(tmp_path / 'out'), form='prompt_completion')
  config = data_config(data_dir=str(tmp_path))
  stored = [
      json.loads(d)
      for split in ('train', 'validation')
      for d in sources.documents('prepared:out', config, split)
  ]
  assert sorted(stored, key=lambda r: r['prompt']) == sorted([{
      'prompt': r['prompt'],
      'completion': r['completion']
  } for r in records], key=lambda r: r['prompt'])
  with pytest.raises(UserError, match='lacks the messages field'):
    list(prepare.documents(tmp_path / 'in' / 'qa.jsonl', form='messages'))


def test_conversation_rows_resume_exactly(corpus):
  tokenizer, documents = corpus['tokenizer'], conversations(30, long_every=4)
  straight = iter(conversation_batches(documents, tokenizer))
  expected = [next(straight) for _ in range(6)]
  first = iter(conversation_batches(documents, tokenizer))
  for _ in range(3):
    next(first)
  resumed = iter(conversation_batches(documents, tokenizer))
  pipeline.set_row_states(resumed, json.loads(json.dumps(pipeline.row_states(first))))
  for want in expected[3:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_a_short_run_on_conversations_learns_the_answers(tmp_path, small_config, losses):
  """Answers repeat the question's words backwards: only what the assistant says is in the
  loss, and it falls; validation reads the held-out conversations the same way."""
  from llama_jax import train_loop
  rng = np.random.default_rng(0)
  (tmp_path / 'in').mkdir()
  with open(tmp_path / 'in' / 'chats.jsonl', 'w') as f:
    for _ in range(1000):
      words = list(rng.choice(WORDS[:12], 3))
      messages = [{
          'role': 'user',
          'content': ' '.join(words)
      }, {
          'role': 'assistant',
          'content': ' '.join(words[::-1])
      }]
      f.write(json.dumps({'messages': messages}) + '\n')
  prepare.prepare(str(tmp_path / 'in'), str(tmp_path / 'chats'), form='messages')
  config = small_config(
      '', str(tmp_path), **{
          'data.name': 'prepared:chats',
          'data.format': 'messages',
          'data.chat_template': 'llama2',
          'train.steps': 40,
          'train.eval_every': 40,
          'optim.decay_steps': 40,
      })
  train_loop.train(config, str(tmp_path / 'run'))
  loss = losses(str(tmp_path / 'run'))
  assert loss[40] < 0.5 * loss[1]


def test_stdlib_conversations_are_docstrings_and_fine_tuning_needs_its_base(tmp_path, small_config):
  from llama_jax import train_loop
  from llama_jax.data import stdlib_qa
  train, held_out = stdlib_qa.split('train'), stdlib_qa.split('validation')
  assert len(train) > 300 and 0 < len(held_out) < len(train) / 10
  assert not set(train) & set(held_out)
  answers = {
      m['messages'][0]['content']: m['messages'][1]['content']
      for m in map(json.loads, train + held_out)
  }
  assert answers['What does `json.dumps` do?'] == 'Serialize ``obj`` to a JSON formatted ``str``.'
  config = small_config('', str(tmp_path), **{'checkpoint.init_params': str(tmp_path / 'tiny')})
  with pytest.raises(UserError, match=r'train it first \(`python train.py --workdir='):
    train_loop.train(config, str(tmp_path / 'run'))


def test_a_mixture_of_text_and_conversations_keeps_every_text_token(corpus):
  """With a conversation source beside it, a text source's documents are cut into row-long
  pieces, in order, none lost, and weigh 1 on every in-document target."""
  tokenizer, seq_len = corpus['tokenizer'], 96
  texts = corpus['documents'][:20]
  form = pipeline.Format(['web', 'chats'], ['text', 'messages'], 'llama2')
  sources_ = [grain.MapDataset.source(texts), grain.MapDataset.source(conversations(20))]
  iterator = iter(
      pipeline.batches(sources_, [1.0, 1.0], tokenizer=tokenizer, batch_size=1, rows=range(1),
                       seq_len=seq_len, seed=0, shuffle=False, prefetch=0, form=form))
  stream = np.concatenate([tokenizer_lib.encode_document(tokenizer, d) for d in texts])
  cursor, cut = 0, 0
  for _ in range(12):
    batch = next(iterator)
    segments = segments_of(batch, 0)
    for k, (ids, weights) in enumerate(segments):
      if weights[0] == 0:  # a conversation: its prompt comes first
        continue
      np.testing.assert_array_equal(ids, stream[cursor:cursor + len(ids)])
      assert np.all(weights[:-1] == 1)
      full_row = k == len(segments) - 1 and batch['segment_ids'][0][-1] != 0
      cursor += len(ids) + full_row  # a row-long piece's last token is only a target
      cut += full_row
  assert cursor > 300 and cut > 0
