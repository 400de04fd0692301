"""Llama 3.1 70B: dim 8192, 80 layers, 64 query heads sharing 8 key/value heads, SwiGLU width
28672, lr 1.5e-4 (Table 3); the rest as llama3_8b. 70,553,706,496 parameters."""

from configs import llama3_8b


def get_config():
  config = llama3_8b.get_config()
  config.model.dim = 8192
  config.model.n_layers = 80
  config.model.n_heads = 64
  config.model.multiple_of = 4096
  config.optim.learning_rate = 1.5e-4
  return config
