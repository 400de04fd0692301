"""Every config key, with its default. Other config files change only what differs.

Model keys are named as in Meta's reference `ModelArgs`. The defaults are LLaMA-7B
trained as in the paper (Touvron et al. 2023, Table 2 and section 2.2).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.dim = 4096  # width of the residual stream
  model.n_layers = 32  # transformer blocks
  model.n_heads = 32  # query heads; head_dim = dim / n_heads
  model.n_kv_heads = ml_collections.FieldReference(None, field_type=int)  # None: = n_heads
  model.vocab_size = 32000  # at least the tokenizer's vocabulary size
  model.multiple_of = 256  # SwiGLU hidden size rounds up to a multiple of this
  model.ffn_dim_multiplier = ml_collections.FieldReference(None, field_type=float)  # scales it
  model.norm_eps = 1e-6  # RMSNorm epsilon
  model.rope_theta = 10000.0  # rotary embedding base
  # None, or {'type': 'linear', 'factor'} / {'type': 'llama3', 'factor', 'low_freq_factor',
  # 'high_freq_factor', 'original_max_position_embeddings'} (llama_jax/rope.py)
  model.rope_scaling = None
  model.tie_embeddings = False  # the output projection is the embedding table (Llama 3.2 1B/3B)
  model.max_seq_len = 2048  # longest sequence the model accepts
  model.dtype = 'bfloat16'  # compute dtype: bfloat16 | float32 | float16 (params are float32)
  model.attention = 'auto'  # auto | reference | blockwise | splash | triton | cudnn (attention.py)
  model.context_parallel = 'all_gather'  # keys/values across mesh.sequence: all_gather | ring
  model.remat = 'full'  # none | full | save_dots | save_attention | offload (llama_jax/model.py)
  model.scan_layers = True  # scan over stacked layers; False loops (debugging)
  model.lora = lora = ml_collections.ConfigDict()  # adapters on a frozen base (llama_jax/lora.py)
  lora.rank = 0  # rank of each adapter; 0 = no adapters, every parameter trains
  lora.alpha = 16.0  # updates are scaled by alpha / rank
  lora.targets = ('wq', 'wk', 'wv', 'wo')  # projections adapted: any of wq wk wv wo w1 w2 w3

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = 1  # pure data parallelism (replicated parameters)
  mesh.fsdp = -1  # data parallelism with sharded parameters and optimizer state; -1 = the rest
  mesh.sequence = 1  # splits activations along the sequence
  mesh.tensor = 1  # splits heads and the MLP width (Megatron-style)
  # Logical axis -> mesh axes. Parameters use embed/heads/kv_heads/head_dim/mlp/vocab/layers
  # (sequence-parallel devices also share the parameter storage); activations use
  # batch/length/act_embed/act_heads/act_mlp/act_vocab.
  mesh.rules = (
      ('embed', ('fsdp', 'sequence')),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('layers', None),
      ('batch', ('data', 'fsdp')),
      ('length', 'sequence'),
      ('act_embed', None),
      ('act_heads', 'tensor'),
      ('act_mlp', 'tensor'),
      ('act_vocab', 'tensor'),
  )

  config.train = train = ml_collections.ConfigDict()
  train.steps = 250_000  # optimizer steps (paper 7B: 1T tokens / 4M tokens per step)
  train.batch_size = 2048  # global batch in sequences (2048 x 2048 = 4M tokens)
  train.seq_len = 2048  # tokens per sequence
  train.param_dtype = 'float32'  # trained weights stored as: float32 | bfloat16 (docs/memory.md)
  train.microbatches = 1  # gradient accumulation: the batch is split and scanned
  train.seed = 0  # parameter initialization and data order
  train.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss; 0 disables it
  train.loss_chunks = 8  # the loss forms the logits of seq_len / loss_chunks positions at a time
  train.eval_every = 1000  # steps between validation losses; 0 disables them
  train.eval_batches = 10  # validation batches per evaluation
  train.eval_tasks = ()  # JSONL task files or lm-eval harness task names, run at each evaluation
  train.eval_task_dir = ''  # a folder of harness task YAML files for train.eval_tasks
  train.max_bad_steps = 10  # stop after this many consecutive non-finite losses
  train.hang_timeout_s = 3600  # no step for this long: print stacks, exit 75 to be restarted

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 3e-4  # peak learning rate
  optim.warmup_steps = 2000  # linear warmup from 0
  optim.end_lr_fraction = 0.1  # cosine decay ends at this fraction of the peak
  optim.decay_steps = 0  # steps of warmup + decay; 0 = train.steps (keep it fixed to extend a run)
  optim.b1 = 0.9  # AdamW beta1
  optim.b2 = 0.95  # AdamW beta2
  optim.eps = 1e-8  # AdamW epsilon
  optim.weight_decay = 0.1  # decoupled weight decay (never on norm scales)
  optim.decay_embeddings = True  # also decay the embedding and output matrices
  optim.clip_norm = 1.0  # global gradient-norm clipping
  optim.state_dtype = 'float32'  # Adam moments stored as: float32 | bfloat16 (docs/memory.md)
  optim.state_memory = 'device'  # where the Adam moments live: device | host (pinned_host)
  optim.master_memory = 'device'  # float32 copy of bfloat16 weights: device | host | none

  config.data = data = ml_collections.ConfigDict()
  data.name = 'builtin_text'  # a TFDS name ('c4/en:3.1.0'), builtin_text, or prepared:FOLDER
  # Several sources: {name: {'dataset': like data.name, 'weight': relative}}; empty: data.name
  data.mixture = ml_collections.ConfigDict()
  data.data_dir = '~/tensorflow_datasets'  # TFDS data dir: a local path or gs:// bucket
  data.text_dir = ''  # builtin_text input folder of .txt/.jsonl/.py files; '' = Python stdlib
  data.text_feature = 'text'  # the feature holding the document text
  data.format = 'text'  # of data.name: text | messages | prompt_completion (a JSON record each)
  data.chat_template = ''  # conversations: '' = the tokenizer's own template, llama2 | llama3
  data.overlong = 'truncate'  # a conversation longer than seq_len + 1: truncate | drop
  data.train_split = 'train'
  data.eval_split = 'validation'
  data.tokenizer = ''  # .model / tokenizer.json / tiktoken file; '' = CKPT/tokenizer/ or trained
  data.segment_mask = True  # keep attention inside each packed document
  data.shuffle = True  # shuffle documents (reshuffled every epoch)
  data.prefetch = 4  # batches prepared ahead by a background thread

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.directory = ''  # where checkpoints go ('' = WORKDIR/checkpoints); gs:// works
  checkpoint.every_steps = 1000  # save every N steps (and at the end)
  checkpoint.keep = 3  # keep the newest K checkpoints
  checkpoint.keep_period = 0  # also keep every step divisible by this forever; 0 = none
  checkpoint.async_save = True  # write in the background while training goes on
  checkpoint.init_params = ''  # a workdir (or convert output) whose parameters start a new run
  checkpoint.allow_new_rope = False  # True: rope_theta / rope_scaling may differ from init_params'

  config.logging = logging = ml_collections.ConfigDict()
  logging.every_steps = 10  # steps between metric rows
  logging.cpu_peak_tflops = 0.0  # peak TFLOP/s of one CPU device, for MFU on CPU; 0 = no MFU
  logging.profile_start = -1  # first step of a jax.profiler trace; -1 = no trace
  logging.profile_steps = 5  # steps traced
  return config
