"""Fine-tuning Llama 2 7B with LoRA on a converted checkpoint (docs/fine_tuning.md).

    python -m llama_jax.convert --source=hf --input=HF_DIR --output=runs/llama2_7b
    python train.py --config=configs/sft.py --workdir=runs/sft \
        --config.checkpoint.init_params=runs/llama2_7b --config.data.name=prepared:FOLDER

Adapters of rank 16 on every projection train on a frozen bfloat16 base. For full
fine-tuning instead, set model.lora.rank=0 and a lower optim.learning_rate (2e-5).
"""

from configs import llama2_7b


def get_config():
  config = llama2_7b.get_config()
  config.model.lora.rank = 16
  config.model.lora.alpha = 32.0
  config.model.lora.targets = ('wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3')

  config.data.mixture = {}  # one source: data.name (give yours: prepared:FOLDER or a TFDS name)

  config.train.steps = 1000  # about 3 epochs of 10k sequences at this batch
  config.train.batch_size = 32
  config.train.eval_every = 100
  config.train.eval_batches = 10

  config.optim.learning_rate = 2e-4  # LoRA's usual rate; full fine-tuning wants about 2e-5
  config.optim.warmup_steps = 30
  config.optim.end_lr_fraction = 0.0
  config.optim.weight_decay = 0.0

  config.checkpoint.every_steps = 200
  return config
