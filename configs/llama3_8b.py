"""Llama 3.1 8B (Llama Team 2024, "The Llama 3 Herd of Models", Table 3 and section 3.4).

dim 4096, 32 layers, 32 query heads sharing 8 key/value heads, SwiGLU width 14336, vocab
128,256, rope theta 500,000 with Llama 3.1's rope scaling to a 128K context, lr 3e-4.
Pre-training runs at sequence 8192; the paper's schedule (given for 405B): 8000 warmup
steps, cosine decay to 1% of the peak over 1.2M steps, a batch that grows from 4M to
16M tokens (here the final 16M: 2048 x 8192). 8,030,261,248 parameters.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.dim = 4096
  config.model.n_layers = 32
  config.model.n_heads = 32
  config.model.n_kv_heads = 8
  config.model.vocab_size = 128_256
  config.model.ffn_dim_multiplier = 1.3
  config.model.multiple_of = 1024
  config.model.norm_eps = 1e-5
  config.model.rope_theta = 500_000.0
  config.model.rope_scaling = dict(type='llama3', factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)
  config.model.max_seq_len = 131_072
  config.train.seq_len = 8192
  config.train.batch_size = 2048  # 16M tokens
  config.train.steps = 1_200_000
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 8000
  config.optim.end_lr_fraction = 0.01
  return config
