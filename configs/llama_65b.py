"""LLaMA-65B as in the paper's Table 2: dim 8192, 64 heads, 80 layers, lr 1.5e-4, 4M-token batch."""

from configs import default, llama_data


def get_config():
  config = default.get_config()
  config.model.dim = 8192
  config.model.n_heads = 64
  config.model.n_layers = 80
  config.model.norm_eps = 1e-5
  config.optim.learning_rate = 1.5e-4
  config.train.steps = 350_000  # 1.4T tokens
  config.data.mixture = llama_data.mixture()  # Table 1 (configs/llama_data.py)
  return config
