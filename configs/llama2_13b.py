"""Llama 2 13B: dim 5120, 40 heads, 40 layers, lr 3e-4; the rest as llama2_7b. 13,015,864,320
parameters."""

from configs import llama2_7b


def get_config():
  config = llama2_7b.get_config()
  config.model.dim = 5120
  config.model.n_heads = 40
  config.model.n_layers = 40
  return config
