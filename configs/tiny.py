"""A ~5M-parameter model that trains on a 2-core CPU in minutes: the default of train.py.

It learns Python from the built-in corpus (the standard library's source) with a
4096-token sentencepiece vocabulary trained on that corpus.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.dim = 256
  config.model.n_layers = 4
  config.model.n_heads = 4
  config.model.vocab_size = 4096
  config.model.multiple_of = 32
  config.model.max_seq_len = 256
  config.model.remat = 'save_dots'  # fastest on CPU (docs/performance.md)

  config.train.steps = 300
  config.train.batch_size = 16
  config.train.seq_len = 256
  config.train.loss_chunks = 1  # fastest on CPU; the logits are small here
  config.train.eval_every = 100
  config.train.eval_batches = 4

  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50

  config.checkpoint.every_steps = 100
  return config
