"""Llama 2 7B (Touvron et al. 2023b, "Llama 2", Table 1 and section 2.2).

Context 4096, 2T tokens in 4M-token batches, AdamW (0.9, 0.95, eps 1e-5), lr 3e-4 with
2000 warmup steps and cosine decay to 10%, weight decay 0.1, clipping 1.0. Its data
mixture is not published. 6,738,415,616 parameters.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.norm_eps = 1e-5
  config.model.max_seq_len = 4096
  config.train.seq_len = 4096
  config.train.batch_size = 1024  # 4M tokens
  config.train.steps = 500_000  # 2T tokens
  config.optim.eps = 1e-5
  return config
