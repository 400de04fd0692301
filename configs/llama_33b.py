"""LLaMA-33B as in the paper's Table 2: dim 6656, 52 heads, 60 layers, lr 1.5e-4, 4M-token batch."""

from configs import default, llama_data


def get_config():
  config = default.get_config()
  config.model.dim = 6656
  config.model.n_heads = 52
  config.model.n_layers = 60
  config.model.norm_eps = 1e-6
  config.optim.learning_rate = 1.5e-4
  config.train.steps = 350_000  # 1.4T tokens
  config.data.mixture = llama_data.mixture()  # Table 1 (configs/llama_data.py)
  return config
