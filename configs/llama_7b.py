"""LLaMA-7B as in the paper's Table 2: dim 4096, 32 heads, 32 layers, lr 3e-4, 4M-token batch."""

from configs import default, llama_data


def get_config():
  config = default.get_config()
  config.model.dim = 4096
  config.model.n_heads = 32
  config.model.n_layers = 32
  config.model.norm_eps = 1e-6
  config.optim.learning_rate = 3e-4
  config.data.mixture = llama_data.mixture()  # Table 1 (configs/llama_data.py)
  return config
