"""Trains a LLaMA: `python train.py [--config=configs/tiny.py] [--workdir=runs/tiny]`.

Run the same command on every host of a TPU pod slice (or every SLURM task); restart
it with the same workdir to resume. Override any config key with --config.a.b=value.
"""

import sys

from absl import flags, logging

from llama_jax import config_flag, processes, train_loop
from llama_jax.errors import UserError

flags.DEFINE_string('workdir', 'runs/tiny', 'Where checkpoints and metrics go (path or gs://).')
flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, to run several '
    'processes without a cluster manager (TPU pods and SLURM need none).')
flags.DEFINE_integer('num_processes', 1, 'Processes in total, with --coordinator_address.')
flags.DEFINE_integer('process_id', 0, 'This process, with --coordinator_address.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO
  try:
    processes.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
    train_loop.train(FLAGS.config, FLAGS.workdir)
  except UserError as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  config_flag.run(main, 'configs/tiny.py', 'Config file (ml_collections).')
