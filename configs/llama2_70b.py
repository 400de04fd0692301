"""Llama 2 70B: dim 8192, 64 query heads sharing 8 key/value heads (GQA), 80 layers, SwiGLU
width 28672, lr 1.5e-4; the rest as llama2_7b. 68,976,648,192 parameters."""

from configs import llama2_7b


def get_config():
  config = llama2_7b.get_config()
  config.model.dim = 8192
  config.model.n_heads = 64
  config.model.n_kv_heads = 8
  config.model.n_layers = 80
  config.model.ffn_dim_multiplier = 1.3
  config.model.multiple_of = 4096
  config.optim.learning_rate = 1.5e-4
  return config
