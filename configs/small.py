"""A ~1B-parameter model (dim 2048, 16 layers) at sequence 2048, for one or a few GPUs."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.dim = 2048
  config.model.n_layers = 16
  config.model.n_heads = 16

  config.train.steps = 20_000
  config.train.batch_size = 16
  config.train.seq_len = 2048
  config.train.eval_every = 500

  config.optim.warmup_steps = 1000
  return config
