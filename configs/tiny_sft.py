"""Fine-tunes the quick start's model (runs/tiny) to answer questions about Python, offline.

    python train.py --workdir=runs/tiny                  # the quick start, first
    python train.py --config=configs/tiny_sft.py --workdir=runs/tiny_sft
    python eval.py --workdir=runs/tiny_sft --chat='What does `json.dumps` do?'

The conversations ("What does `json.dumps` do?" answered by its docstring's first
paragraph) are built from the standard library (llama_jax.data.stdlib_qa); the built-in
llama2 template renders them (the tiny sentencepiece tokenizer has none), and only the
answers are in the loss. Every parameter trains, from runs/tiny's.
"""

from configs import tiny
from llama_jax.data import tokenizer as tokenizer_lib


def get_config():
  config = tiny.get_config()
  config.checkpoint.init_params = 'runs/tiny'
  # The quick start's tokenizer (trained on the stdlib source, cached under data.data_dir).
  config.data.tokenizer = tokenizer_lib.trained_path(config.data, config.model.vocab_size)
  config.data.name = 'stdlib_qa'
  config.data.format = 'messages'
  config.data.chat_template = 'llama2'

  config.train.steps = 150  # ~40 epochs of the 363 training conversations (~95 a step)
  config.train.eval_every = 50
  config.train.eval_batches = 1  # the ~13 held-out conversations fill one batch

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 5
  config.optim.end_lr_fraction = 0.0
  config.optim.weight_decay = 0.0

  config.checkpoint.every_steps = 50
  return config
