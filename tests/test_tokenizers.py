"""The three tokenizer formats: ids equal to `transformers` on a tokenizer.json built here (and
the same vocabulary in tiktoken format), special-token strings stay text, one BOS per
document, clear errors, the tokenizer found beside a checkpoint, and a run trained with it."""

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llama_jax import convert, train_loop
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.data.tokenizers import tiktoken_model
from llama_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Llama 3's split pattern, written out here (not taken from the code under test).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                  r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = (
    'The quick brown fox jumps over the lazy dog.',
    'naïve café, Größe, élève; Ελληνικά και русский текст.',
    '日本語のテキストと中文文本，한국어 문장도 있습니다。',
    'العربية والعبرית וגם हिन्दी',
    'def add(a, b):\n    return a + b  # 42\n\n\tif x != 1999:\n        pass\r\n',
    '    leading spaces, trailing spaces   \n\n\n   \t\t  ',
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷 and I'm, you're, they've, it'LL",
    'numbers 1234567 3.14159 0x1F, symbols <=> ~~~ $$ @@ \\\\ ```',
    '',
)
CORPUS = [text * 3 for text in TEXTS
         ] + ['alpha beta gamma delta epsilon ' * 20, 'for i in range(10):\n    print(i)\n' * 20]


def _build_llama3_like(folder, vocab_size=600):
  """A byte-level BPE tokenizer.json with Llama 3's pre-tokenizer, special tokens (after the
  vocabulary) and post-processor that prepends <|begin_of_text|>, and its config files."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), 'isolated'),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  ])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(CORPUS, trainer)
  base = tokenizer.get_vocab_size()
  specials = [
      '<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
      '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',
      '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>'
  ] + [f'<|reserved_special_token_{i}|>' for i in range(2, 247)]
  assert len(specials) == 256
  tokenizer.add_special_tokens(specials)
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single='<|begin_of_text|> $A', pair='<|begin_of_text|> $A <|begin_of_text|> $B',
      special_tokens=[('<|begin_of_text|>', base)])
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(
        {
            'bos_token': '<|begin_of_text|>',
            'eos_token': '<|end_of_text|>',
            'chat_template': '{% for m in messages %}{{ m.content }}{% endfor %}',
            'tokenizer_class': 'PreTrainedTokenizerFast'
        }, f)
  return folder


def _write_tiktoken(json_folder, path):
  """The tokenizer.json's vocabulary (without its added tokens) as tiktoken rank lines."""
  vocab = json.load(open(os.path.join(json_folder, 'tokenizer.json')))['model']['vocab']
  byte_of = {c: b for b, c in bytes_to_unicode().items()}
  with open(path, 'w') as f:
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
      f.write(f'{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}\n')
  return path


def _convert_from_tiktoken(tiktoken_path, json_folder, folder):
  """The tiktoken ranks as a tokenizer.json, written by transformers' TikTokenConverter (as
  Llama 3's was made from Meta's tokenizer.model), with json_folder's specials and config."""
  trained = tokenizers.Tokenizer.from_file(os.path.join(json_folder, 'tokenizer.json'))
  specials = [token.content for _, token in sorted(trained.get_added_tokens_decoder().items())]
  converted = transformers.convert_slow_tokenizer.TikTokenConverter(
      vocab_file=tiktoken_path, extra_special_tokens=specials).converted()
  converted.post_processor = trained.post_processor
  os.makedirs(folder, exist_ok=True)
  converted.save(os.path.join(folder, 'tokenizer.json'))
  config = os.path.join(json_folder, 'tokenizer_config.json')
  with open(config) as source, open(os.path.join(folder, 'tokenizer_config.json'), 'w') as target:
    target.write(source.read())
  return folder


@pytest.fixture(scope='module')
def json_folder(tmp_path_factory):
  return _build_llama3_like(str(tmp_path_factory.mktemp('llama3_json')))


@pytest.fixture(scope='module')
def converted_folder(json_folder, tiktoken_file, tmp_path_factory):
  return _convert_from_tiktoken(tiktoken_file, json_folder,
                                str(tmp_path_factory.mktemp('from_tiktoken')))


@pytest.fixture(scope='module')
def reference(json_folder):
  return transformers.AutoTokenizer.from_pretrained(json_folder)


@pytest.fixture(scope='module')
def tiktoken_file(json_folder, tmp_path_factory):
  return _write_tiktoken(json_folder, str(tmp_path_factory.mktemp('tiktoken') / 'tokenizer.model'))


@pytest.mark.parametrize('made_by', ['trainer', 'tiktoken_converter'])
def test_tokenizer_json_ids_equal_transformers(made_by, json_folder, converted_folder):
  """A file the `tokenizers` trainer made goes through `tokenizers` (its merges are not every
  split of every token); one converted from tiktoken ranks, as Llama 3's is, through tiktoken."""
  folder = json_folder if made_by == 'trainer' else converted_folder
  reference = transformers.AutoTokenizer.from_pretrained(folder)
  ours = tokenizer_lib.load(folder)  # the folder: its tokenizer.json
  assert bool(ours.tiktoken) == (made_by == 'tiktoken_converter')
  assert isinstance(reference, transformers.PreTrainedTokenizerFast)
  assert ours.bos_id == reference.bos_token_id and ours.eos_id == reference.eos_token_id
  assert ours.vocab_size == len(reference) and ours.chat_template == reference.chat_template
  assert ours.encode_batch(
      list(TEXTS)) == [reference(text, add_special_tokens=False)['input_ids'] for text in TEXTS]
  for text in TEXTS:
    assert ours.decode(ours.encode(text)) == text
    # The post-processor prepends BOS in transformers; a document still gets exactly one.
    document = tokenizer_lib.encode_document(ours, text)
    assert document[:-1] == reference(text)['input_ids'] and document[-1] == ours.eos_id
    assert document.count(ours.bos_id) == 1
  assert ours.stop_ids == {
      reference.convert_tokens_to_ids(t) for t in ('<|end_of_text|>', '<|eot_id|>', '<|eom_id|>')
  }


def test_the_same_vocabulary_in_tiktoken_format_gives_the_same_ids(tiktoken_file, reference):
  ours = tokenizer_lib.load(tiktoken_file)
  assert isinstance(ours, tiktoken_model.TiktokenTokenizer)
  assert ours.vocab_size == len(reference)
  for name in ('<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|eot_id|>'):
    assert ours.special_tokens[name] == reference.convert_tokens_to_ids(name)
  assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)
  for text in TEXTS:
    assert ours.encode(text) == reference(text, add_special_tokens=False)['input_ids']
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize('kind', ['json', 'tiktoken'])
def test_token_bytes_add_up_to_the_text(kind, json_folder, tiktoken_file):
  ours = tokenizer_lib.load(json_folder if kind == 'json' else tiktoken_file)
  lengths = ours.token_bytes()
  assert lengths.shape == (ours.vocab_size,) and lengths.dtype == np.int32
  for text in TEXTS:
    assert lengths[tokenizer_lib.encode_document(ours, text)].sum() == len(text.encode())
  assert not lengths[list(ours.special_tokens.values())].any()


@pytest.mark.parametrize('kind', ['json', 'tiktoken'])
def test_special_token_strings_in_text_stay_text(kind, json_folder, tiktoken_file, reference):
  ours = tokenizer_lib.load(json_folder if kind == 'json' else tiktoken_file)
  text = 'user wrote <|eot_id|> and <|begin_of_text|><|end_of_text|> literally'
  ids = ours.encode(text)
  assert not set(ids) & set(ours.special_tokens.values())
  assert ids == reference(text, add_special_tokens=False, split_special_tokens=True)['input_ids']
  assert ours.decode(ids) == text


def test_sentencepiece_keeps_its_control_strings_as_text(tmp_path):
  ours = tokenizer_lib.train(CORPUS * 5, 600, str(tmp_path / 'tok.model'))
  assert ours.special_tokens == {'<unk>': 0, '<s>': 1, '</s>': 2}
  assert ours.stop_ids == {2} and ours.chat_template is None
  ids = ours.encode('a <s> b </s>')
  assert 1 not in ids and 2 not in ids and ours.decode(ids) == 'a <s> b </s>'


def test_unknown_and_unreadable_files_are_one_sentence(tmp_path, json_folder):
  (tmp_path / 'words.txt').write_text('hello world\nnot a tokenizer\n')
  with pytest.raises(UserError, match=r'words.txt is none of the formats known \(data.tokenizer'):
    tokenizer_lib.load(str(tmp_path / 'words.txt'))
  (tmp_path / 'other.json').write_text('{"model": "no tokenizer"}')
  with pytest.raises(UserError, match='is JSON but not a tokenizer.json'):
    tokenizer_lib.load(str(tmp_path / 'other.json'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='holds no tokenizer.json or tokenizer.model'):
    tokenizer_lib.load(str(tmp_path / 'empty'))
  no_names = tmp_path / 'no_names'
  no_names.mkdir()
  spec = json.load(open(os.path.join(json_folder, 'tokenizer.json')))
  spec['added_tokens'], spec['post_processor'] = [], None
  (no_names / 'tokenizer.json').write_text(json.dumps(spec))
  with pytest.raises(UserError, match='names no BOS and EOS token'):
    tokenizer_lib.load(str(no_names))


def test_a_tokenizer_larger_than_the_model_is_one_sentence(json_folder, small_config, tmp_path):
  config = small_config(str(tmp_path), str(tmp_path), **{'data.tokenizer': json_folder})
  size = tokenizer_lib.load(json_folder).vocab_size
  tokenizer_lib.for_data(config.data, size + 100)  # a model with spare rows: fine
  with pytest.raises(
      UserError, match=f'has {size} tokens but model.vocab_size is 400; set '
      f'model.vocab_size to at least {size}'):
    tokenizer_lib.for_data(config.data, 400)


@pytest.fixture(scope='module')
def json_run(tmp_path_factory, corpus_dirs, small_config, json_folder):
  """A small run trained with the tokenizer.json (its model has spare vocabulary rows)."""
  workdir = str(tmp_path_factory.mktemp('json_run'))
  config = small_config(
      *corpus_dirs, **{
          'data.tokenizer': json_folder,
          'model.vocab_size': 1024,
          'train.steps': 20,
          'train.eval_every': 20
      })
  train_loop.train(config, workdir)
  return workdir, config


@pytest.mark.slow
def test_training_with_a_tokenizer_json_lowers_the_loss(json_run, losses):
  workdir, _ = json_run
  curve = losses(workdir)
  assert np.mean([curve[s] for s in (18, 19, 20)]) < np.mean([curve[s] for s in (1, 2, 3)]) - 0.5


@pytest.mark.slow
def test_a_converted_folders_tokenizer_is_found_and_follows_fine_tuning(
    json_run, json_folder, corpus_dirs, small_config, tmp_path):
  workdir, config = json_run
  converted = tmp_path / 'converted'
  convert.write_orbax(*convert.read_orbax(workdir), str(converted))
  (converted / 'tokenizer').mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (converted / 'tokenizer' / name).write_bytes(open(os.path.join(json_folder, name), 'rb').read())
  # eval.py with no tokenizer flag: the converted folder's tokenizer/.
  done = subprocess.run([
      sys.executable, 'eval.py', f'--workdir={converted}', '--prompt=def f(', '--max_new_tokens=4',
      f'--config.data.data_dir={tmp_path / "tfds"}'
  ], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  results, = converted.glob('eval_step*.json')
  assert len(json.loads(results.read_text())['generations']) == 1

  # Fine-tuning from it copies the tokenizer into the new workdir.
  tuned = tmp_path / 'tuned'
  fine_tune = small_config(
      *corpus_dirs, **{
          'model.vocab_size': 1024,
          'train.steps': 2,
          'train.eval_every': 0,
          'checkpoint.init_params': str(converted)
      })
  train_loop.train(fine_tune, str(tuned))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    assert (tuned / 'tokenizer' / name).read_bytes() == (converted / 'tokenizer' /
                                                         name).read_bytes()
  assert tokenizer_lib.for_data(
      fine_tune.data, 1024,
      checkpoints=(str(tuned),)).vocab_size == (tokenizer_lib.load(json_folder).vocab_size)

  # A different tokenizer the user keeps in the workdir is never overwritten.
  other = tmp_path / 'other'
  (other / 'tokenizer').mkdir(parents=True)
  (other / 'tokenizer' / 'tokenizer.json').write_text('{"mine": true}')
  with pytest.raises(UserError, match='tokenizer.json is not the same as in .*converted/tok'):
    train_loop.train(fine_tune, str(other))
  assert (other / 'tokenizer' / 'tokenizer.json').read_text() == '{"mine": true}'
