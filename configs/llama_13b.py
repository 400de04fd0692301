"""LLaMA-13B as in the paper's Table 2: dim 5120, 40 heads, 40 layers, lr 3e-4, 4M-token batch."""

from configs import default, llama_data


def get_config():
  config = default.get_config()
  config.model.dim = 5120
  config.model.n_heads = 40
  config.model.n_layers = 40
  config.model.norm_eps = 1e-6
  config.optim.learning_rate = 3e-4
  config.data.mixture = llama_data.mixture()  # Table 1 (configs/llama_data.py)
  return config
