"""Evaluates a checkpoint: `python eval.py --workdir=DIR [--step=N] [--config.a.b=v ...]`.

With no other flag it reports loss, perplexity and bits per byte on the validation
split (of a mixture: on the mixture and on each source); --prompt / --prompts_file generate
text; --task scores a multiple-choice JSONL task; --harness_tasks runs lm-evaluation-harness
tasks and --paper_table the LLaMA paper's zero-shot table (the eval extra). The model's shape
comes from the checkpoint; --config.* overrides (mesh, data, batch size) apply on top of
the config saved with it.
"""

import json
import sys

import jax
import jax.numpy as jnp
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import config_flag, evaluation, generate
from llama_jax import experiment as experiment_lib
from llama_jax import sharding as sharding_lib
from llama_jax.data import chat, mixture
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import ConfigError, UserError

flags.DEFINE_string(
    'workdir', None, 'A train.py workdir or a llama_jax.convert output (its '
    'checkpoints/ folder is read; --checkpoint_dir reads another).')
flags.DEFINE_string('checkpoint_dir', '', 'The checkpoint folder, if not WORKDIR/checkpoints.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.DEFINE_multi_string('prompt', [], 'A prompt to continue (repeatable).')
flags.DEFINE_string('prompts_file', '', 'A text file with one prompt per line.')
flags.DEFINE_multi_string(
    'chat', [], 'A question to answer through the chat template (data.chat_template, else the '
    "tokenizer's own; repeatable).")
flags.DEFINE_string('task', '', 'A JSONL multiple-choice task: {"context", "choices", "label"}.')
flags.DEFINE_integer('max_new_tokens', 64, 'Tokens generated per prompt.')
flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 is greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens holding this mass.')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_bool('bfloat16', False, 'Restore the parameters in bfloat16 (half the memory).')
flags.DEFINE_list('harness_tasks', [], 'lm-evaluation-harness tasks to run (the eval extra).')
flags.DEFINE_string('harness_include_path', '', 'A folder of harness task YAML files.')
flags.DEFINE_integer('harness_limit', None, 'At most this many examples per harness task.')
flags.DEFINE_bool(
    'paper_table', False, "Run the LLaMA paper's zero-shot Table 3 tasks with the "
    'harness and print them beside the paper.')
FLAGS = flags.FLAGS


def run():
  overrides = config_flags.get_override_values(FLAGS['config'])
  directory = checkpoint_lib.directory_of(FLAGS.workdir, FLAGS.checkpoint_dir)
  config, step = evaluation.load_config(directory, FLAGS.step, overrides, FLAGS.config)
  devices = jax.devices()
  try:
    sharding_lib.mesh_shape(config.mesh, len(devices))
  except ConfigError:
    if any(key.startswith('mesh.') for key in overrides):
      raise
    config.mesh.update(dict(data=1, fsdp=-1, sequence=1, tensor=1))  # the writer's mesh
  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    with open(FLAGS.prompts_file) as f:
      prompts += [line.rstrip('\n') for line in f if line.strip()]
  harness_tasks = list(FLAGS.harness_tasks)
  if FLAGS.paper_table:
    harness_tasks += [
        task for _, task, _, _ in evaluation.harness_module().PAPER_TABLE_3
        if task not in harness_tasks
    ]
  evaluation.check_tasks(harness_tasks, FLAGS.harness_include_path)  # before minutes of restore
  experiment = experiment_lib.build(config, devices)
  params = evaluation.restore_params(directory, step, experiment.model_config,
                                     experiment.params_shardings, FLAGS.bfloat16)
  perplexity = not prompts and not FLAGS.chat and not FLAGS.task and not harness_tasks
  corpus = mixture.open_corpus(config.data) if perplexity else None  # the only use of the data
  tokenizer = tokenizer_lib.for_data(config.data, config.model.vocab_size,
                                     checkpoints=(FLAGS.workdir,))  # never trains one
  model = evaluation.model_of(params, config)
  results = {'step': step}

  if prompts:
    sampling = generate.Sampling(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    outputs = generate.generate(model, ids, sampling, tokenizer.stop_ids, FLAGS.seed)
    results['generations'] = [{
        'prompt': p,
        'completion': tokenizer.decode(o)
    } for p, o in zip(prompts, outputs)]
    for row in results['generations']:
      print(f'--- {row["prompt"]}\n{row["completion"]}')
  if FLAGS.chat:
    sampling = generate.Sampling(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    ids = [
        chat.render(tokenizer, [{
            'role': 'user',
            'content': question
        }], template_name=config.data.chat_template, add_generation_prompt=True)[0]
        for question in FLAGS.chat
    ]
    outputs = generate.generate(model, ids, sampling, tokenizer.stop_ids, FLAGS.seed)
    results['chat'] = [{
        'question': q,
        'answer': tokenizer.decode(o)
    } for q, o in zip(FLAGS.chat, outputs)]
    for row in results['chat']:
      print(f'--- {row["question"]}\n{row["answer"]}')
  if FLAGS.task:
    results['task'] = evaluation.multiple_choice(model, tokenizer, evaluation.read_task(FLAGS.task))
    print(f'{FLAGS.task}: accuracy {results["task"]["accuracy"]:.4f}, length-normalized '
          f'{results["task"]["accuracy_norm"]:.4f} over {results["task"]["examples"]} examples')
  if harness_tasks:
    harness = evaluation.harness_module()
    harness_model = harness.HarnessModel(model, tokenizer)
    results['harness'] = harness.evaluate(harness_model, harness_tasks, FLAGS.harness_include_path,
                                          FLAGS.harness_limit)
    results['harness_requests_per_s'] = harness_model.requests_per_second()
    for task, metrics in results['harness'].items():
      print(f'{task}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    if FLAGS.paper_table:
      print(harness.paper_table(results['harness'], f'{FLAGS.workdir} step {step}'))
  if perplexity:
    rows = sharding_lib.rows_of_process(experiment.batch_sharding, config.train.batch_size)
    by_source = evaluation.perplexity_by_source(config, experiment.eval_step, params, corpus,
                                                tokenizer, rows, experiment.batch_sharding,
                                                jnp.asarray(tokenizer.token_bytes()))
    results['perplexity'] = by_source.pop('')
    if by_source:
      results['perplexity_by_source'] = by_source
    for name, result in [('', results['perplexity']), *by_source.items()]:
      print(f'{name or "+".join(s.name for s in corpus.sources)}/{config.data.eval_split} at '
            f'step {step}: ' + ', '.join(
                f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()))
  if jax.process_index() == 0:
    path = epath.Path(FLAGS.workdir) / f'eval_step{step}.json'
    path.write_text(json.dumps(results, indent=2))
    print(f'wrote {path}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    run()
  except UserError as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  config_flag.run(
      main, 'configs/default.py', 'Its --config.* overrides apply; for converted weights, '
      'its groups besides `model` too.')
