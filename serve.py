"""Serves a checkpoint over an OpenAI-compatible HTTP API: `python serve.py --workdir=DIR`.

A train.py workdir or a llama_jax.convert output, restored as eval.py does (--step,
--bfloat16, --config.* overrides such as the mesh). Requests share --slots decode slots of
one KV cache (continuous batching, llama_jax/serving/engine.py). Listens on 127.0.0.1
unless --host is given; docs/serving.md says what a wider --host exposes.
"""

import os
import signal
import sys

import jax
import uvicorn
from absl import flags, logging
from ml_collections import config_flags

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import config_flag, evaluation
from llama_jax import experiment as experiment_lib
from llama_jax import sharding as sharding_lib
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import ConfigError, UserError
from llama_jax.serving import api
from llama_jax.serving import engine as engine_lib
from llama_jax.serving.metrics import ServingMetrics

flags.DEFINE_string(
    'workdir', None, 'A train.py workdir or a llama_jax.convert output (its '
    'checkpoints/ folder is read; --checkpoint_dir reads another).')
flags.DEFINE_string('checkpoint_dir', '', 'The checkpoint folder, if not WORKDIR/checkpoints.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.DEFINE_bool('bfloat16', False, 'Restore the parameters in bfloat16 (half the memory).')
flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (loopback unless given).')
flags.DEFINE_integer('port', 8000, 'Port to listen on.')
flags.DEFINE_string('api_key', '', 'Requests to /v1/* must send "Authorization: Bearer KEY".')
flags.DEFINE_string('model_name', '', 'The model id clients send (default: the workdir name).')
flags.DEFINE_integer('slots', 16, 'Requests decoded at once (rows of the shared KV cache).')
flags.DEFINE_integer('max_queue', 64, 'Requests waiting for a slot beyond which the answer is 429.')
flags.DEFINE_integer('max_tokens', 1024, 'The largest max_tokens a request may ask for.')
flags.DEFINE_float('shutdown_timeout', 30.0,
                   'On SIGTERM, seconds given to the requests in flight to finish.')
FLAGS = flags.FLAGS


def build_server():
  """The engine (warmed up) and the HTTP routes for FLAGS."""
  for name, value in (('slots', FLAGS.slots), ('max_queue', FLAGS.max_queue), ('max_tokens',
                                                                               FLAGS.max_tokens)):
    if value < 1:
      raise UserError(f'--{name} must be at least 1, got {value}.')
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
  experiment = experiment_lib.build(config, devices)
  params = evaluation.restore_params(directory, step, experiment.model_config,
                                     experiment.params_shardings, FLAGS.bfloat16)
  tokenizer = tokenizer_lib.for_data(config.data, config.model.vocab_size,
                                     checkpoints=(FLAGS.workdir,))  # never trains one
  metrics = ServingMetrics()
  engine = engine_lib.Engine(evaluation.model_of(params, config), FLAGS.slots, FLAGS.max_queue,
                             metrics)
  metrics.watch(engine)
  engine.warm_up()
  name = FLAGS.model_name or os.path.basename(FLAGS.workdir.rstrip('/'))
  server = api.Server(engine, tokenizer, name, metrics, FLAGS.api_key, FLAGS.max_tokens,
                      config.data.chat_template)
  return engine, server, step


def run():
  engine, server, step = build_server()
  if FLAGS.host not in ('127.0.0.1', 'localhost', '::1') and not FLAGS.api_key:
    logging.warning('serving %s without --api_key: anyone who can reach it may use it.', FLAGS.host)
  engine.start()
  # uvicorn stops accepting on SIGTERM, waits for the requests in flight, then raises the
  # signal again: this handler takes it so that the process exits 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  config = uvicorn.Config(server.app(), host=FLAGS.host, port=FLAGS.port, log_level='warning',
                          timeout_graceful_shutdown=FLAGS.shutdown_timeout)
  print(
      f'serving {server.model_name} (step {step}, {FLAGS.slots} slots) on '
      f'http://{FLAGS.host}:{FLAGS.port}/v1', flush=True)
  try:
    uvicorn.Server(config).run()
  finally:
    engine.stop()
  print('stopped', flush=True)


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
