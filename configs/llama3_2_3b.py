"""Llama 3.2 3B (model card): dim 3072, 28 layers, 24 query heads sharing 8 key/value heads,
SwiGLU width 8192, tied input/output embeddings, rope scaling factor 32; the rest as
llama3_2_1b. 3,212,749,824 parameters."""

from configs import llama3_2_1b


def get_config():
  config = llama3_2_1b.get_config()
  config.model.dim = 3072
  config.model.n_layers = 28
  config.model.n_heads = 24
  config.model.ffn_dim_multiplier = 1.0
  return config
