"""EleutherAI's lm-evaluation-harness on our checkpoints (`pip install -e '.[eval]'`).

  python eval.py --workdir=W --harness_tasks=piqa,hellaswag [--harness_include_path=DIR]
  python eval.py --workdir=W --paper_table    # the LLaMA paper's zero-shot Table 3
  python -m llama_jax.lm_eval_model --model llama_jax --model_args workdir=W --tasks piqa

`HarnessModel` answers the harness's three kinds of request with our model: log-likelihoods
of continuations (batched by length through scoring.score_continuations, the scorer
of our own multiple-choice evaluation), rolling log-likelihoods of whole documents, and
greedy generation with the KV cache, cut at the request's stop strings.
"""

import collections
import json
import math
import time

import lm_eval
from lm_eval import tasks as harness_tasks
from lm_eval import utils as harness_utils
from lm_eval.api.model import LM

from llama_jax import generate, scoring
from llama_jax.errors import UserError

# The LLaMA paper's Table 3 (zero-shot): column, the harness's task, the metric shown
# (acc_norm: the log-likelihood divided by the choice's length in characters, as the paper
# normalizes; the harness's acc_bytes divides by UTF-8 bytes; BoolQ and WinoGrande use plain
# accuracy), and the paper's LLaMA rows in percent.
PAPER_TABLE_3 = (
    ('BoolQ', 'boolq', 'acc', (76.5, 78.1, 83.1, 85.3)),
    ('PIQA', 'piqa', 'acc_norm', (79.8, 80.1, 82.3, 82.8)),
    ('SIQA', 'social_iqa', 'acc', (48.9, 50.4, 50.4, 52.3)),
    ('HellaSwag', 'hellaswag', 'acc_norm', (76.1, 79.2, 82.8, 84.2)),
    ('WinoGrande', 'winogrande', 'acc', (70.1, 73.0, 76.0, 77.0)),
    ('ARC-e', 'arc_easy', 'acc_norm', (72.8, 74.8, 80.0, 78.9)),
    ('ARC-c', 'arc_challenge', 'acc_norm', (47.6, 52.7, 57.8, 56.0)),
    ('OBQA', 'openbookqa', 'acc_norm', (57.2, 56.4, 58.6, 60.2)),
)
PAPER_MODELS = ('LLaMA 7B (paper)', 'LLaMA 13B (paper)', 'LLaMA 33B (paper)', 'LLaMA 65B (paper)')


class HarnessModel(LM):
  """An lm-evaluation-harness model backed by our Transformer and tokenizer."""
  def __init__(self, model, tokenizer, batch_size: int = 16):
    super().__init__()
    self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
    self.max_length = model.config.max_seq_len
    self.timing = collections.defaultdict(lambda: [0, 0.0])  # kind: [requests, seconds]

  def _fit(self, tokens: list[int], start: int) -> tuple[list[int], int]:
    """Drops the oldest context tokens of a sequence longer than the model takes (its
    last token is only a target)."""
    excess = len(tokens) - (self.max_length + 1)
    if excess <= 0:
      return tokens, start
    return tokens[excess:], max(start - excess, 1)

  def _scores(self, kind: str, sequences: list[tuple[list[int], int]]):
    start = time.perf_counter()
    scores = scoring.score_continuations(self.model, [self._fit(*s) for s in sequences],
                                         self.batch_size)
    self.timing[kind][0] += len(sequences)
    self.timing[kind][1] += time.perf_counter() - start
    return scores

  def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]):
    """(log-likelihood, greedy) of each continuation's tokens after its context's tokens."""
    return self._scores('loglikelihood', [(c + x, len(c)) for c, x in pairs])

  def loglikelihood(self, requests):
    return self._scores(
        'loglikelihood',
        [scoring.continuation_tokens(self.tokenizer, *request.args) for request in requests])

  def loglikelihood_rolling(self, requests):
    windows, owners = [], []
    for index, request in enumerate(requests):
      tokens = self.tokenizer.encode(request.args[0])
      for context, continuation in map(
          harness_utils.make_disjoint_window,
          harness_utils.get_rolling_token_windows(token_list=tokens,
                                                  prefix_token=self.tokenizer.bos_id,
                                                  max_seq_len=self.max_length, context_len=1)):
        windows.append((context + continuation, len(context)))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (score, _) in zip(owners, self._scores('loglikelihood_rolling', windows)):
      totals[owner] += score
    return totals

  def generate_until(self, requests):
    start = time.perf_counter()
    outputs = [''] * len(requests)
    groups = collections.defaultdict(list)  # requests with the same options run together
    for index, request in enumerate(requests):
      groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
    for options, indices in groups.items():
      options = json.loads(options)
      until = options.get('until') or []
      until = [until] if isinstance(until, str) else until
      new_tokens = min(int(options.get('max_gen_toks', 256)), self.max_length - 1)
      sampling = generate.Sampling(new_tokens, float(options.get('temperature', 0.0) or 0.0))
      for first in range(0, len(indices), self.batch_size):
        chunk = indices[first:first + self.batch_size]
        room = self.max_length - new_tokens - 1  # for the prompt after BOS; its end is kept
        prompts = [[self.tokenizer.bos_id] + _last(self.tokenizer.encode(requests[i].args[0]), room)
                   for i in chunk]
        prompts += [[self.tokenizer.bos_id]] * (self.batch_size - len(chunk))  # one shape
        generated = generate.generate(self.model, prompts, sampling, self.tokenizer.stop_ids)
        for index, tokens in zip(chunk, generated):
          text = self.tokenizer.decode(tokens)
          cut = min((text.find(stop) for stop in until if stop and stop in text), default=-1)
          outputs[index] = text if cut < 0 else text[:cut]
    self.timing['generate_until'][0] += len(requests)
    self.timing['generate_until'][1] += time.perf_counter() - start
    return outputs

  def requests_per_second(self) -> dict:
    return {kind: n / seconds for kind, (n, seconds) in self.timing.items() if seconds}


def _last(tokens: list[int], count: int) -> list[int]:
  return tokens[max(len(tokens) - count, 0):]


def check_names(tasks: list[str], include_path: str = ''):
  """The harness's task manager, after checking that it knows every task."""
  manager = harness_tasks.TaskManager(include_path=include_path or None)
  unknown = [task for task in tasks if task not in manager.all_tasks]
  if unknown:
    raise UserError(f'the harness knows no task {", ".join(unknown)}; use names from '
                    '`lm_eval --tasks list`, or give the folder of their YAML files.')
  return manager


def evaluate(harness_model: HarnessModel, tasks: list[str], include_path: str = '',
             limit: int | None = None) -> dict:
  """{task: {metric: value}} from the harness for `tasks` (names it knows, or defined in
  YAML files under include_path)."""
  manager = check_names(tasks, include_path)
  output = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks), task_manager=manager,
                                   limit=limit, log_samples=False, bootstrap_iters=0)
  return {
      task: {
          metric.removesuffix(',none'): value
          for metric, value in metrics.items()
          if isinstance(value, (int, float)) and not metric.startswith('alias')
      } for task, metrics in output['results'].items()
  }


def paper_table(results: dict, label: str) -> str:
  """Table 3's layout: a row for `results` (from `evaluate` on the paper's tasks), then the
  paper's LLaMA rows, in percent."""
  header = '| model | ' + ' | '.join(column for column, _, _, _ in PAPER_TABLE_3) + ' |'
  rows = [header, '|' + ' --- |' * (len(PAPER_TABLE_3) + 1)]
  ours = []
  for _, task, metric, _ in PAPER_TABLE_3:
    value = results.get(task, {}).get(metric)
    ours.append('—' if value is None or math.isnan(value) else f'{100 * value:.1f}')
  rows.append(f'| {label} | ' + ' | '.join(ours) + ' |')
  for i, model in enumerate(PAPER_MODELS):
    rows.append(f'| {model} | ' +
                ' | '.join(f'{paper[i]:.1f}' for _, _, _, paper in PAPER_TABLE_3) + ' |')
  return '\n'.join(rows)
