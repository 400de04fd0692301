"""Llama 3.2 1B (model card): dim 2048, 16 layers, 32 query heads sharing 8 key/value heads,
SwiGLU width 8192, tied input/output embeddings, rope scaling factor 32; context 128K.
Its lr and batch are not published: those of llama3_8b. 1,235,814,400 parameters."""

from configs import llama3_8b


def get_config():
  config = llama3_8b.get_config()
  config.model.dim = 2048
  config.model.n_layers = 16
  config.model.n_heads = 32
  config.model.ffn_dim_multiplier = 1.5
  config.model.multiple_of = 256
  config.model.tie_embeddings = True
  config.model.rope_scaling.factor = 32.0
  return config
