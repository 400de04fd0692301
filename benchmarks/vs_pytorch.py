"""Our train step against Hugging Face transformers + PyTorch on the same machine and shape.

  python -m benchmarks.vs_pytorch [--dim=512 --layers=8 --heads=8 --vocab=32000 \
      --seq=256 --batch=8 --rounds=3 --steps=3]

For float32 and bfloat16 mixed precision (float32 master weights on both sides; torch
autocast) it alternates rounds of our jitted step (forward, backward, clipped AdamW) and
of `LlamaForCausalLM` + `torch.optim.AdamW` + gradient clipping, and prints tokens/s of
each, their ratio, our model TFLOP/s, and the fraction of this machine's fastest JAX matmul
at that precision (measured in the same run; for bfloat16 the faster of bfloat16 x
bfloat16 -> bfloat16 and -> float32) that our step reaches. The header names the CPU's
matrix extensions (AMX, AVX-512 BF16). Compile time is excluded.
Needs the test extra (torch, transformers).
"""

import os
import time

import jax
import numpy as np
import torch
import transformers
from absl import app, flags

from benchmarks import train_step as train_step_benchmark
from configs import default
from llama_jax import experiment as experiment_lib
from llama_jax import metrics as metrics_lib
from llama_jax import model as model_lib

flags.DEFINE_integer('dim', 512, 'Model width.')
flags.DEFINE_integer('layers', 8, 'Transformer blocks.')
flags.DEFINE_integer('heads', 8, 'Attention heads.')
flags.DEFINE_integer('vocab', 32000, 'Vocabulary size.')
flags.DEFINE_integer('seq', 256, 'Sequence length.')
flags.DEFINE_integer('batch', 8, 'Global batch in sequences.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
flags.DEFINE_integer('steps', 3, 'Timed steps per side per round.')
flags.DEFINE_list('precisions', ['float32', 'bfloat16'], 'Compute precisions to compare.')
flags.DEFINE_string('remat', 'save_dots', 'Our model.remat (save_dots: the fastest on CPU).')
FLAGS = flags.FLAGS


def our_step(precision, tokens):
  config = default.get_config()
  config.model.update(
      dict(dim=FLAGS.dim, n_layers=FLAGS.layers, n_heads=FLAGS.heads, vocab_size=FLAGS.vocab,
           max_seq_len=FLAGS.seq, dtype=precision, remat=FLAGS.remat, multiple_of=256))
  config.train.update(dict(batch_size=FLAGS.batch, seq_len=FLAGS.seq, steps=1000,
                           loss_chunks=1))  # one chunk: the fastest on CPU
  config.data.segment_mask = False
  built = experiment_lib.build(config, jax.devices())
  state = built.create_state(0)
  batch = jax.device_put(train_step_benchmark.batch_of(tokens), built.batch_sharding)
  start = time.perf_counter()
  compiled = built.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {'state': state}

  def run(steps):
    for _ in range(steps):
      holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)

  run(2)  # warm up
  return run, compiled, compile_s, metrics_lib.flops_per_token(built.model_config, FLAGS.seq,
                                                               built.n_params)


def torch_step(precision, tokens):
  config = transformers.LlamaConfig(
      hidden_size=FLAGS.dim, num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads,
      num_key_value_heads=FLAGS.heads, vocab_size=FLAGS.vocab,
      intermediate_size=model_lib.ModelConfig(dim=FLAGS.dim, n_heads=FLAGS.heads).hidden_dim,
      max_position_embeddings=FLAGS.seq, attn_implementation='sdpa')
  model = transformers.LlamaForCausalLM(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.tensor(tokens, dtype=torch.long)

  def run(steps):
    for _ in range(steps):
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bfloat16'):
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
      loss.backward()
      with torch.profiler.record_function('optimizer'):  # a label for benchmarks.step_profile
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

  run(2)  # warm up
  return run


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  tokens = np.random.default_rng(0).integers(0, FLAGS.vocab, (FLAGS.batch, FLAGS.seq + 1),
                                             dtype=np.int32)
  batch_tokens = FLAGS.batch * FLAGS.seq
  print(f'shape: dim {FLAGS.dim}, {FLAGS.layers} layers, {FLAGS.heads} heads, vocab '
        f'{FLAGS.vocab}, seq {FLAGS.seq}, batch {FLAGS.batch}; {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} ({train_step_benchmark.cpu_matrix_extensions()}), torch '
        f'{torch.__version__} with {torch.get_num_threads()} threads')
  for precision in FLAGS.precisions:
    peak, product = train_step_benchmark.matmul_limit(precision)
    ours, _, compile_s, flops_per_token = our_step(precision, tokens)
    theirs = torch_step(precision, tokens)
    times = {'ours': 0.0, 'torch': 0.0}
    for _ in range(FLAGS.rounds):
      for name, run in (('ours', ours), ('torch', theirs)):
        start = time.perf_counter()
        run(FLAGS.steps)
        times[name] += time.perf_counter() - start
    steps = FLAGS.rounds * FLAGS.steps
    ours_tps, torch_tps = (steps * batch_tokens / times[k] for k in ('ours', 'torch'))
    tflops = flops_per_token * ours_tps / jax.device_count() / 1e12
    print(f'{precision}: ours {ours_tps:,.0f} tokens/s, torch {torch_tps:,.0f} tokens/s, ratio '
          f'{ours_tps / torch_tps:.2f}x; ours {tflops:.3f} model TFLOP/s = '
          f'{tflops * 1e12 / peak:.0%} of the fastest measured {precision} matmul '
          f'{peak / 1e12:.3f} TFLOP/s ({product}); compile {compile_s:.1f}s')


if __name__ == '__main__':
  app.run(main)
