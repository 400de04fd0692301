"""lm-evaluation-harness on our model: each request kind against a naive computation, parity
with the harness's own Hugging Face model, a local task, evaluation during training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx

from llama_jax import convert, evaluation, harness, scoring, train_loop
from llama_jax import model as model_lib
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = os.path.join(REPO, 'tests', 'example_task.jsonl')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # the harness's datasets: local files only


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory, corpus_dirs):
  documents = []
  for root, _, files in os.walk(corpus_dirs[0]):
    documents += [open(os.path.join(root, f), encoding='utf-8').read() for f in files]
  documents += [json.dumps(json.loads(line)) for line in open(TASK)]
  return tokenizer_lib.train(documents, 512, str(tmp_path_factory.mktemp('tok') / 'tok.model'))


@pytest.fixture(scope='module')
def model():
  config = model_lib.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                 multiple_of=16, max_seq_len=64, dtype='float32')
  return model_lib.Transformer(config, rngs=nnx.Rngs(3))


class Request:  # what the harness hands a model: an Instance's args
  def __init__(self, *args):
    self.args = args


@nnx.jit
def _full_forward(model, tokens):
  return model(tokens)[0]


def naive_logits(model, tokens):
  """[len(tokens), vocab] logits of one forward pass over the whole sequence, no cache. Run
  padded on the right to the model's length (one compile): a causal model's logits at a
  position do not depend on what follows it."""
  length = model.config.max_seq_len
  padded = np.zeros((1, length), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_full_forward(model, padded)[0, :len(tokens)], np.float64)


def naive_scores(model, tokens, start):
  """log p(tokens[start:] | tokens[:start]) and greedy, from one forward pass."""
  logits = naive_logits(model, tokens[:-1])
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  positions = range(start, len(tokens))
  return (sum(logp[t - 1, tokens[t]] for t in positions),
          all(logp[t - 1].argmax() == tokens[t] for t in positions))


def joint_tokens(tokenizer, context, continuation):
  """BOS + context + continuation tokenized together, and where the context's own tokens end
  (these tests' pairs do not merge across the boundary: asserted)."""
  context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
  tokens = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
  assert tokens[:len(context_ids)] == context_ids
  return tokens, len(context_ids)


def test_a_pair_merged_across_the_boundary_keeps_the_contexts_tokens(tokenizer):
  # Cut words in two: for some, the whole word is one token that the context's half is not.
  merged = []
  for word in ('alpha', 'return', 'print', 'range', 'import', 'lambda', 'value', 'string'):
    for cut in range(1, len(word)):
      context, continuation = 'x = ' + word[:cut], word[cut:]
      context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
      joint = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
      if joint[:len(context_ids)] != context_ids:
        merged.append((context, continuation, context_ids))
  assert merged  # the fallback below is exercised
  for context, continuation, context_ids in merged:
    tokens, start = scoring.continuation_tokens(tokenizer, context, continuation)
    assert (tokens, start) == (context_ids + tokenizer.encode(continuation), len(context_ids))


def test_loglikelihood_equals_a_naive_forward_pass(model, tokenizer):
  requests = [
      Request('def add(a, b):\n    return', ' a + b'),
      Request('', 'alpha beta'),
      Request('for i in range(10):', ' print(i)'),
      Request('x' * 200, ' y')
  ]  # longer than the model: the context is cut, on the left
  got = harness.HarnessModel(model, tokenizer, batch_size=4).loglikelihood(requests)
  for request, (score, greedy) in zip(requests, got):
    tokens, start = joint_tokens(tokenizer, *request.args)
    tokens, start = tokens[-65:], max(start - max(len(tokens) - 65, 0), 1)
    want_score, want_greedy = naive_scores(model, tokens, start)
    assert score == pytest.approx(want_score, abs=1e-4) and greedy == want_greedy


def test_rolling_loglikelihood_scores_every_token_once(model, tokenizer):
  from lm_eval import utils
  short, long = 'def f(x):\n    return x + 1\n', 'alpha beta gamma delta ' * 40
  got = harness.HarnessModel(model,
                             tokenizer).loglikelihood_rolling([Request(short),
                                                               Request(long)])
  tokens = [tokenizer.bos_id] + tokenizer.encode(short)
  assert got[0] == pytest.approx(naive_scores(model, tokens, 1)[0], abs=1e-4)
  ids = tokenizer.encode(long)
  assert len(ids) > 64  # several windows of the model's 64 tokens
  # The harness's windows, each scored by a naive forward pass: every token exactly once.
  windows = [
      utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
          token_list=ids, prefix_token=tokenizer.bos_id, max_seq_len=64, context_len=1)
  ]
  assert sum(len(continuation) for _, continuation in windows) == len(ids)
  want = sum(naive_scores(model, c + x, len(c))[0] for c, x in windows)
  assert got[1] == pytest.approx(want, abs=1e-3)


def naive_greedy(model, tokenizer, prompt, new_tokens):
  tokens = [tokenizer.bos_id] + tokenizer.encode(prompt)
  for _ in range(new_tokens):
    logits = naive_logits(model, tokens)[-1]
    tokens.append(int(logits.argmax()))
    if tokens[-1] == tokenizer.eos_id:
      break
  generated = tokens[len(tokenizer.encode(prompt)) + 1:]
  if generated and generated[-1] == tokenizer.eos_id:
    generated = generated[:-1]
  return tokenizer.decode(generated)


@pytest.mark.slow
def test_generate_until_is_greedy_and_stops_at_the_strings(model, tokenizer):
  prompts = ['def add(a, b):', 'for i in']
  plain = [naive_greedy(model, tokenizer, p, 12) for p in prompts]
  assert all(plain)
  stop = plain[0][3:5]  # a string the greedy continuation contains
  requests = [Request(p, {'until': [stop], 'max_gen_toks': 12}) for p in prompts]
  got = harness.HarnessModel(model, tokenizer, batch_size=2).generate_until(requests)
  for text, want in zip(got, plain):
    cut = want.find(stop)
    assert text == (want if cut < 0 else want[:cut])
  assert stop not in got[0] and len(got[0]) < len(plain[0])
  # More new tokens than the model holds (64): 63 are generated, after BOS and none of the
  # prompt (its end would be kept if there were room).
  long = harness.HarnessModel(model, tokenizer).generate_until(
      [Request('x ' * 100, {
          'until': [],
          'max_gen_toks': 500
      })])
  assert long[0] == naive_greedy(model, tokenizer, '', 63)


def test_token_loglikelihoods_equal_the_harness_hugging_face_model(make_hf_model, tmp_path):
  from lm_eval.models.huggingface import HFLM
  hf_model = make_hf_model(tmp_path / 'hf', n_kv_heads=2)
  config, params = convert.read_hf(str(tmp_path / 'hf'))
  ours = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  nnx.update(ours, params)
  # Requests as token ids, so both sides score the same tokens; HFLM wants some tokenizer.
  vocabulary = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<s>': 1}, unk_token='<s>'))
  hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocabulary, bos_token='<s>',
                                                      eos_token='<s>')
  theirs = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, backend='causal', device='cpu',
                batch_size=4)
  rng = np.random.default_rng(0)
  pairs = [([1] + rng.integers(3, 102, int(rng.integers(1, 30))).tolist(),
            rng.integers(3, 102, int(rng.integers(1, 8))).tolist()) for _ in range(10)]
  want = theirs._loglikelihood_tokens([(('', ''), c, x) for c, x in pairs], disable_tqdm=True)
  got = harness.HarnessModel(ours, None).loglikelihood_tokens(pairs)
  for (score, greedy), (their_score, their_greedy) in zip(got, want):
    assert score == pytest.approx(their_score, abs=1e-4) and greedy == their_greedy


# Choices of several bytes per character (whole tokens of the test tokenizer, so they cost
# the model about as much per character as ASCII ones) beside ASCII ones: normalizing by
# characters (acc_norm) and by bytes (acc_bytes) pick differently on some of them.
NON_ASCII_CHOICES = (' 日本 語', ' 日本', ' 語', ' café', ' naïve', ' naïve café', ' 日本 café')
ASCII_CHOICES = (' beta', ' alpha', ' delta gamma', ' mu', ' return', ' import')
NON_ASCII_EXAMPLES = [('x =', [a, b]) for a in NON_ASCII_CHOICES for b in ASCII_CHOICES]


def _task_yaml(folder, name, data_file):
  (folder / f'{name}.yaml').write_text(f'''task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
''')


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  """Harness multiple-choice tasks defined locally: local_choice over
  tests/example_task.jsonl, non_ascii over NON_ASCII_EXAMPLES (every label 0)."""
  folder = tmp_path_factory.mktemp('tasks')
  _task_yaml(folder, 'local_choice', TASK)
  with open(folder / 'non_ascii.jsonl', 'w') as f:
    for context, choices in NON_ASCII_EXAMPLES:
      f.write(json.dumps({'context': context, 'choices': choices, 'label': 0}) + '\n')
  _task_yaml(folder, 'non_ascii', folder / 'non_ascii.jsonl')
  return str(folder)


@pytest.mark.slow
def test_a_local_task_scores_like_a_naive_per_example_scorer(model, tokenizer, task_dir):
  results = harness.evaluate(harness.HarnessModel(model, tokenizer), ['local_choice', 'non_ascii'],
                             task_dir)
  examples = {
      'local_choice': [json.loads(line) for line in open(TASK)],
      'non_ascii': [json.loads(line) for line in open(os.path.join(task_dir, 'non_ascii.jsonl'))]
  }
  picks_differ = False
  for task, task_examples in examples.items():
    # (Its tokenization is checked on its own above; here, the harness's accuracies.)
    correct = correct_chars = correct_bytes = 0
    for example in task_examples:
      choices = example['choices']
      scores = [
          naive_scores(model, *scoring.continuation_tokens(tokenizer, example['context'],
                                                           choice))[0] for choice in choices
      ]
      correct += int(np.argmax(scores) == example['label'])
      # acc_norm divides by the choice's length in characters, acc_bytes in UTF-8 bytes.
      by_chars = np.argmax([s / len(c) for s, c in zip(scores, choices)])
      by_bytes = np.argmax([s / len(c.encode()) for s, c in zip(scores, choices)])
      correct_chars += int(by_chars == example['label'])
      correct_bytes += int(by_bytes == example['label'])
      picks_differ |= by_chars != by_bytes
    got = results[task]
    assert got['acc'] == pytest.approx(correct / len(task_examples))
    assert got['acc_norm'] == pytest.approx(correct_chars / len(task_examples))
    assert got['acc_bytes'] == pytest.approx(correct_bytes / len(task_examples))
  assert picks_differ  # the non-ASCII choices tell characters and bytes apart
  assert results['non_ascii']['acc_norm'] != results['non_ascii']['acc_bytes']


def test_the_paper_table_shows_ours_beside_the_paper():
  table = harness.paper_table({'piqa': {'acc_norm': 0.5}, 'boolq': {'acc': 0.625}}, 'mine')
  lines = table.splitlines()
  assert lines[0].startswith('| model | BoolQ | PIQA | SIQA | HellaSwag |')
  assert lines[2] == '| mine | 62.5 | 50.0 | — | — | — | — | — | — |'
  assert lines[3] == '| LLaMA 7B (paper) | 76.5 | 79.8 | 48.9 | 76.1 | 70.1 | 72.8 | 47.6 | 57.2 |'


@pytest.mark.slow
def test_bad_harness_inputs_are_one_sentence(model, tokenizer, tmp_path):
  with pytest.raises(UserError, match='the harness knows no task no_such_task'):
    harness.evaluate(harness.HarnessModel(model, tokenizer), ['no_such_task'])
  with pytest.raises(UserError, match='task file .*missing.jsonl does not exist'):
    evaluation.check_tasks([str(tmp_path / 'missing.jsonl')])
  done = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={tmp_path}', '--harness_tasks=piqa'], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and 'error: no checkpoints in' in done.stderr


@pytest.fixture(scope='module')
def run_with_tasks(corpus_dirs, small_config, tmp_path_factory, task_dir):
  """(workdir, last metrics): 2 steps that evaluate two tasks at step 2 and save step 2."""
  config = small_config(*corpus_dirs, **{'train.steps': 2, 'train.eval_every': 2})
  config.train.eval_tasks = (TASK, 'local_choice')
  config.train.eval_task_dir = task_dir
  workdir = tmp_path_factory.mktemp('run')
  return workdir, train_loop.train(config, str(workdir))


@pytest.mark.slow
def test_tasks_run_during_training(run_with_tasks, metrics_rows):
  workdir, last = run_with_tasks
  assert {
      'task/example_task/accuracy', 'task/example_task/accuracy_norm', 'task/local_choice/acc',
      'task/local_choice/acc_norm'
  } <= set(last)
  rows = metrics_rows(workdir)
  assert any('task/local_choice/acc' in row for row in rows)


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_a_checkpoint(run_with_tasks, task_dir, tmp_path):
  """On the run above: its step-2 checkpoint (evaluating during training changes no weight)."""
  from llama_jax import lm_eval_model
  workdir, _ = run_with_tasks
  command = [sys.executable, '-m', 'llama_jax.lm_eval_model', '--model', 'llama_jax']
  done = subprocess.run(
      command + [
          '--model_args', f'workdir={workdir},step=2', '--tasks', 'local_choice', '--include_path',
          task_dir, '--batch_size', '4', '--output_path',
          str(tmp_path / 'out')
      ], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results, = (tmp_path / 'out').rglob('results_*.json')
  got = json.loads(results.read_text())['results']['local_choice']
  model, tokenizer = lm_eval_model.restore(str(workdir))
  want = harness.evaluate(harness.HarnessModel(model, tokenizer), ['local_choice'], task_dir)
  assert got['acc,none'] == pytest.approx(want['local_choice']['acc'])
  assert got['acc_norm,none'] == pytest.approx(want['local_choice']['acc_norm'])
  with pytest.raises(
      UserError,
      match=r'--model_args for llama_jax take workdir=W\[,step=N,bfloat16=True\]; got work_dir=x\.'
  ):
    lm_eval_model.LlamaJaxLM.create_from_arg_string('work_dir=x')  # what lm_eval's CLI calls
