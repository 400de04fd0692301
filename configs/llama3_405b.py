"""Llama 3.1 405B: dim 16384, 126 layers, 128 query heads sharing 8 key/value heads, SwiGLU
width 53248, lr 8e-5 decaying to 8e-7 (Table 3, section 3.4.1); the rest as llama3_8b.
405,853,388,800 parameters."""

from configs import llama3_8b


def get_config():
  config = llama3_8b.get_config()
  config.model.dim = 16384
  config.model.n_layers = 126
  config.model.n_heads = 128
  config.model.ffn_dim_multiplier = 1.2
  config.model.multiple_of = 4096
  config.optim.learning_rate = 8e-5
  return config
