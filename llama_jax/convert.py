"""Weight conversion between Meta / Hugging Face LLaMA checkpoints and this project's Orbax.

  python -m llama_jax.convert --source=hf --input=HF_DIR --output=OUT_DIR
  python -m llama_jax.convert --source=meta --input=META_DIR --output=OUT_DIR
  python -m llama_jax.convert --source=orbax --input=WORKDIR [--step=N] --output=HF_DIR
  python -m llama_jax.convert --source=orbax --input=LORA_WORKDIR --merge_lora [--to=orbax] ...
  python -m llama_jax.convert --source=orbax --input=LORA_WORKDIR --peft --output=ADAPTER_DIR

The Orbax output is a parameters-only checkpoint in OUT_DIR/checkpoints/0 that eval.py
reads (`--workdir=OUT_DIR`) and train.py fine-tunes (`--config.checkpoint.init_params`),
with the source's tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, tokenizer.model) in OUT_DIR/tokenizer/; an
export to Hugging Face copies WORKDIR/tokenizer/ back beside config.json. Rope scaling
(Llama 3.1) and tied embeddings (Llama 3.2 1B/3B) travel both ways.
Tensors are read one at a time into the stacked float32 arrays: the model is in host
memory once. The input folder is only read. A LoRA run's adapters are read with the base
they apply to: --merge_lora folds them into the weights (a plain model, Hugging Face or
Orbax), --peft writes them alone in Hugging Face PEFT's format for the base's HF export.
"""

import dataclasses
import glob
import json
import os
import shutil
import sys

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import evaluation, lora
from llama_jax import model as model_lib
from llama_jax import rope
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import UserError

# Our parameter (path in the stacked model) -> Hugging Face name, per layer where {i}.
LAYER_NAMES = {
    ('attention', 'wq'): 'self_attn.q_proj',
    ('attention', 'wk'): 'self_attn.k_proj',
    ('attention', 'wv'): 'self_attn.v_proj',
    ('attention', 'wo'): 'self_attn.o_proj',
    ('feed_forward', 'w1'): 'mlp.gate_proj',
    ('feed_forward', 'w3'): 'mlp.up_proj',
    ('feed_forward', 'w2'): 'mlp.down_proj',
    ('attention_norm', 'scale'): 'input_layernorm',
    ('ffn_norm', 'scale'): 'post_attention_layernorm',
}
# Meta's names for the same tensors, and the axis along which model-parallel shards split them.
META_LAYER_NAMES = {
    'self_attn.q_proj': ('attention.wq', 0),
    'self_attn.k_proj': ('attention.wk', 0),
    'self_attn.v_proj': ('attention.wv', 0),
    'self_attn.o_proj': ('attention.wo', 1),
    'mlp.gate_proj': ('feed_forward.w1', 0),
    'mlp.up_proj': ('feed_forward.w3', 0),
    'mlp.down_proj': ('feed_forward.w2', 1),
    'input_layernorm': ('attention_norm', None),
    'post_attention_layernorm': ('ffn_norm', None),
}
META_GLOBAL_NAMES = {
    'model.embed_tokens': ('tok_embeddings', 1),
    'model.norm': ('norm', None),
    'lm_head': ('output', 0)
}


def _ffn_keys(dim: int, hidden: int) -> dict:
  """multiple_of / ffn_dim_multiplier that make Meta's formula give `hidden` exactly."""
  base = int(2 * 4 * dim / 3)
  if hidden >= base:
    return {'multiple_of': hidden, 'ffn_dim_multiplier': None}
  return {'multiple_of': 1, 'ffn_dim_multiplier': (hidden + 0.5) / base}


# Hugging Face rope types -> ours (rope.py); the keys each takes besides the type.
HF_ROPE_KEYS = {
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
}
# Meta's Llama 3.1+ `use_scaled_rope` (llama-models' apply_scaling constants).
META_ROPE_SCALING = rope.Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192)
# Llama 3.2 1B and 3B ((dim, layers)) use factor 32, which their params.json does not say (their
# Hugging Face config.json does; llama-models' reference code applied 8: its issue #166).
META_FACTOR_32_SHAPES = ((2048, 16), (3072, 28))


def meta_rope_scaling(meta: dict) -> rope.Llama3Scaling | None:
  """The rope scaling of a Meta params.json."""
  if not meta.get('use_scaled_rope', False):
    return None
  if (meta['dim'], meta['n_layers']) in META_FACTOR_32_SHAPES:
    return dataclasses.replace(META_ROPE_SCALING, factor=32.0)
  return META_ROPE_SCALING


# tokenizer.json / tokenizer.model and the files read beside them (data/tokenizer.py).
TOKENIZER_FILES = tokenizer_lib.FOLDER_FILES + tokenizer_lib.CONFIG_FILES


def _rope_scaling_from_hf(hf: dict):
  """Our rope scaling from config.json's `rope_parameters` (transformers 5) or `rope_scaling`."""
  rope_config = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rope_config.get('rope_type', rope_config.get('type', 'default'))
  if kind == 'default':
    return None
  if kind not in HF_ROPE_KEYS:
    raise UserError(f'rope scaling {kind!r} is not supported; the ones that convert are '
                    f'default, {", ".join(HF_ROPE_KEYS)}.')
  return rope.scaling_from_dict({
      'type': kind,
      **{
          key: rope_config[key] for key in HF_ROPE_KEYS[kind]
      }
  })


def model_config_from_hf(hf: dict) -> model_lib.ModelConfig:
  if hf.get('model_type') != 'llama' or 'LlamaForCausalLM' not in (hf.get('architectures') or
                                                                   ['LlamaForCausalLM']):
    raise UserError(f'the Hugging Face model is {hf.get("architectures") or hf.get("model_type")}'
                    ', not LlamaForCausalLM; only LLaMA checkpoints convert.')
  rope_config = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  dim, heads = hf['hidden_size'], hf['num_attention_heads']
  if hf.get('head_dim',
            dim // heads) != dim // heads or hf.get('attention_bias') or hf.get('mlp_bias'):
    raise UserError('this LLaMA variant (head_dim != hidden_size / heads, or biases) is '
                    'not supported.')
  return model_lib.ModelConfig(
      dim=dim, n_layers=hf['num_hidden_layers'], n_heads=heads,
      n_kv_heads=hf.get('num_key_value_heads') or heads, vocab_size=hf['vocab_size'],
      norm_eps=hf.get('rms_norm_eps', 1e-6),
      rope_theta=float(hf.get('rope_theta') or rope_config.get('rope_theta', 10000.0)),
      rope_scaling=_rope_scaling_from_hf(hf),
      tie_embeddings=bool(hf.get('tie_word_embeddings',
                                 False)), max_seq_len=hf.get('max_position_embeddings',
                                                             2048), dtype='float32',
      **_ffn_keys(dim, hf['intermediate_size']))


def hf_config_from_model(config: model_lib.ModelConfig, tokenizer=None) -> dict:
  """config.json for `config`; BOS and the end ids from `tokenizer` (LLaMA's 1 and 2 without one:
  the sentencepiece tokenizers this project trains)."""
  bos_id, end_ids = (1, [2]) if tokenizer is None else (
      tokenizer.bos_id, [tokenizer.eos_id, *sorted(tokenizer.stop_ids - {tokenizer.eos_id})])
  scaling = dataclasses.asdict(config.rope_scaling) if config.rope_scaling else {'type': 'default'}
  rope_parameters = {'rope_type': scaling.pop('type'), 'rope_theta': config.rope_theta, **scaling}
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'hidden_size': config.dim,
      'intermediate_size': config.hidden_dim,
      'num_hidden_layers': config.n_layers,
      'num_attention_heads': config.n_heads,
      'num_key_value_heads': config.kv_heads,
      'head_dim': config.head_dim,
      'vocab_size': config.vocab_size,
      'rms_norm_eps': config.norm_eps,
      'rope_theta': config.rope_theta,
      'rope_parameters': rope_parameters,
      'max_position_embeddings': config.max_seq_len,
      'hidden_act': 'silu',
      'tie_word_embeddings': config.tie_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      'bos_token_id': bos_id,
      'eos_token_id': end_ids[0] if len(end_ids) == 1 else end_ids,
      'torch_dtype': 'float32',
  }


def to_ours(name: str, tensor: np.ndarray, config: model_lib.ModelConfig) -> np.ndarray:
  """A Hugging Face tensor ([out, in] matrices) in our layout."""
  heads, kv_heads, head_dim, dim = config.n_heads, config.kv_heads, config.head_dim, config.dim
  if name.endswith(('q_proj', 'k_proj', 'v_proj')):
    n = heads if name.endswith('q_proj') else kv_heads
    return tensor.T.reshape(dim, n, head_dim)
  if name.endswith('o_proj'):
    return tensor.T.reshape(heads, head_dim, dim)
  if name.endswith(('gate_proj', 'up_proj', 'down_proj', 'lm_head')):
    return tensor.T
  return tensor  # embedding [vocab, embed] and norm scales


def to_hf(name: str, array: np.ndarray) -> np.ndarray:
  """The inverse of `to_ours`."""
  if name.endswith(('q_proj', 'k_proj', 'v_proj')):
    return array.reshape(array.shape[0], -1).T
  if name.endswith('o_proj'):
    return array.reshape(-1, array.shape[-1]).T
  if name.endswith(('gate_proj', 'up_proj', 'down_proj', 'lm_head')):
    return array.T
  return array


def hf_names(config: model_lib.ModelConfig):
  """(our path, layer or None, Hugging Face name) for every tensor."""
  yield ('embedding',), None, 'model.embed_tokens'
  yield ('norm', 'scale'), None, 'model.norm'
  if not config.tie_embeddings:
    yield ('output',), None, 'lm_head'
  for i in range(config.n_layers):
    for path, name in LAYER_NAMES.items():
      yield ('layers', *path), i, f'model.layers.{i}.{name}'


def _empty_params(config):
  """Our parameter tree as uninitialized float32 numpy arrays (filled tensor by tensor)."""
  params = nnx.state(model_lib.abstract_model(config), nnx.Param)
  return params, jax.tree.map(lambda leaf: np.empty(leaf.shape, np.float32), params.to_pure_dict())


def _fill(config, read_tensor) -> nnx.State:
  params, arrays = _empty_params(config)
  for path, layer, name in hf_names(config):
    tensor = to_ours(name, np.asarray(read_tensor(name), np.float32), config)
    target = arrays
    for key in path[:-1]:
      target = target[key]
    destination = target[path[-1]] if layer is None else target[path[-1]][layer]
    if destination.shape != tensor.shape:
      raise UserError(f'tensor {name} has shape {tensor.shape}, expected {destination.shape}.')
    destination[...] = tensor
  params.replace_by_pure_dict(arrays)
  return params


def read_hf(folder: str):
  """(model config, parameters) of a Hugging Face LlamaForCausalLM folder."""
  from safetensors import safe_open
  config_path = os.path.join(folder, 'config.json')
  if not os.path.exists(config_path):
    raise UserError(f'{folder} has no config.json; give a Hugging Face model folder.')
  with open(config_path) as f:
    hf = json.load(f)
  config = model_config_from_hf(hf)
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    raise UserError(f'{folder} has no .safetensors files; save the model with '
                    'save_pretrained(safe_serialization=True).')
  where = {}
  for path in files:
    with safe_open(path, 'flax') as f:
      where.update({key: path for key in f.keys()})

  def read_tensor(name):
    key = f'{name}.weight'
    if key not in where:
      raise UserError(f'tensor {key} is missing from {folder}.')
    with safe_open(where[key], 'flax') as f:
      return f.get_tensor(key)

  return config, _fill(config, read_tensor)


def _interleaved_to_rotate_half(tensor, heads):
  """Meta pairs rotary features (2i, 2i+1); we pair (i, i + head_dim/2): permute rows."""
  out_dim, in_dim = tensor.shape
  return tensor.reshape(heads, out_dim // heads // 2, 2,
                        in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def read_meta(folder: str):
  """(model config, parameters) of Meta's consolidated.*.pth shards + params.json."""
  import torch
  params_path = os.path.join(folder, 'params.json')
  shard_paths = sorted(glob.glob(os.path.join(folder, 'consolidated.*.pth')))
  if not os.path.exists(params_path) or not shard_paths:
    raise UserError(f'{folder} is not a Meta checkpoint: it needs params.json and '
                    'consolidated.*.pth files.')
  with open(params_path) as f:
    meta = json.load(f)
  expected = [os.path.join(folder, f'consolidated.{i:02d}.pth') for i in range(len(shard_paths))]
  if shard_paths != expected:
    raise UserError(f'{folder} has shards {", ".join(map(os.path.basename, shard_paths))}; '
                    'they must be numbered consolidated.00.pth upwards with none missing.')
  shards = [torch.load(p, map_location='cpu', mmap=True, weights_only=True) for p in shard_paths]
  vocab_size = meta.get('vocab_size', -1)
  if vocab_size <= 0:
    vocab_size = sum(s['tok_embeddings.weight'].shape[0] for s in shards[:1])
  scaled = meta.get('use_scaled_rope', False)
  # params.json has no context length: Llama 3.1 (scaled rope) 128K, Llama 3.0 (its 128256
  # vocabulary) 8192, LLaMA 1/2 2048.
  max_seq_len = meta.get('max_seq_len',
                         131072 if scaled else 8192 if vocab_size == 128256 else 2048)
  config = model_lib.ModelConfig(
      dim=meta['dim'], n_layers=meta['n_layers'], n_heads=meta['n_heads'],
      n_kv_heads=meta.get('n_kv_heads'), vocab_size=vocab_size,
      multiple_of=meta.get('multiple_of', 256), ffn_dim_multiplier=meta.get('ffn_dim_multiplier'),
      norm_eps=meta.get('norm_eps', 1e-5), rope_theta=float(meta.get('rope_theta', 10000.0)),
      rope_scaling=meta_rope_scaling(meta), tie_embeddings='output.weight' not in shards[0],
      max_seq_len=max_seq_len, dtype='float32')

  def read_tensor(name):
    if name.startswith('model.layers.'):
      layer, hf_name = name[len('model.layers.'):].split('.', 1)
      meta_name, axis = META_LAYER_NAMES[hf_name]
      meta_name = f'layers.{layer}.{meta_name}'
    else:
      meta_name, axis = META_GLOBAL_NAMES[name]
    key = f'{meta_name}.weight'
    if any(key not in shard for shard in shards):
      raise UserError(f'tensor {key} is missing from a shard in {folder}.')
    pieces = [shard[key].float().numpy() for shard in shards]
    tensor = pieces[0] if axis is None else np.concatenate(pieces, axis=axis)
    if name.endswith('q_proj'):
      tensor = _interleaved_to_rotate_half(tensor, config.n_heads)
    elif name.endswith('k_proj'):
      tensor = _interleaved_to_rotate_half(tensor, config.kv_heads)
    return tensor

  try:
    return config, _fill(config, read_tensor)
  except UserError as error:
    raise UserError(f'{error} Are shards of {folder} missing?') from None


def copy_tokenizer(source: str, destination: str) -> None:
  """Copies the tokenizer files of folder `source` (those of TOKENIZER_FILES it has)."""
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source, name)):
      os.makedirs(destination, exist_ok=True)
      shutil.copy2(os.path.join(source, name), os.path.join(destination, name))


def write_orbax(config: model_lib.ModelConfig, params, output: str,
                tokenizer_from: str = '') -> None:
  """A parameters-only checkpoint in OUTPUT/checkpoints/0 with the model config, and the
  tokenizer files of folder `tokenizer_from` in OUTPUT/tokenizer/."""
  for directory in (os.path.join(output, 'checkpoints'), os.path.join(output, 'tokenizer')):
    if os.path.exists(directory) and os.listdir(directory):
      raise UserError(f'{directory} is not empty; choose an empty --output.')
  checkpoint_lib.save_params(os.path.join(output, 'checkpoints'), 0, params,
                             {'model': dataclasses.asdict(config)})
  if tokenizer_from:
    copy_tokenizer(tokenizer_from, os.path.join(output, 'tokenizer'))


def read_orbax(workdir: str, step: int | None = None):
  """(model config, parameters as numpy) of a train.py workdir or converted folder."""
  directory = os.path.join(workdir, 'checkpoints')
  step = checkpoint_lib.find_step(directory, step)
  config = model_lib.ModelConfig.from_config(checkpoint_lib.saved_config(directory, step)['model'])
  lacks_output = 'output' not in checkpoint_lib.saved_param_names(directory, step)
  if lacks_output and not (config.tie_embeddings or config.lora.rank):  # LoRA: adapters only
    raise UserError(f'{directory}/{step} has no output matrix (its embeddings are tied) but its '
                    'config says tie_embeddings=False; restore it with model.tie_embeddings=True.')
  abstract = nnx.state(model_lib.abstract_model(config), nnx.Param)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  # Every weight in float32 as stored, a LoRA run's base too (training holds it in
  # model.dtype): --merge_lora adds the update to the weights themselves, in float32.
  params = evaluation.restore_params(directory, step, dataclasses.replace(config, dtype='float32'),
                                     jax.tree.map(lambda _: cpu, abstract))
  return config, params


def write_hf(config: model_lib.ModelConfig, params, output: str, tokenizer_from: str = '') -> None:
  """A Hugging Face folder: config.json, one safetensors file per layer (plus one for the
  embedding, final norm and output), so only one layer is ever copied at a time, and the
  tokenizer files of folder `tokenizer_from`."""
  from safetensors.numpy import save_file
  if os.path.exists(output) and os.listdir(output):
    raise UserError(f'{output} is not empty; choose an empty --output.')
  os.makedirs(output, exist_ok=True)
  arrays = params.to_pure_dict()
  groups = {}  # layer (None: the rest) -> [(path, name)]
  for path, layer, name in hf_names(config):
    groups.setdefault(layer, []).append((path, name))
  weight_map, total_bytes = {}, 0
  for index, (layer, entries) in enumerate(groups.items(), 1):
    filename = f'model-{index:05d}-of-{len(groups):05d}.safetensors'
    tensors = {}
    for path, name in entries:
      array = arrays
      for key in path:
        array = array[key]
      array = np.asarray(array if layer is None else array[layer], np.float32)
      tensors[f'{name}.weight'] = np.ascontiguousarray(to_hf(name, array))
    save_file(tensors, os.path.join(output, filename), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(tensors, filename))
    total_bytes += sum(t.nbytes for t in tensors.values())
  with open(os.path.join(output, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total_bytes}, 'weight_map': weight_map}, f, indent=2)
  tokenizer = None
  if tokenizer_from and any(
      os.path.exists(os.path.join(tokenizer_from, name)) for name in tokenizer_lib.FOLDER_FILES):
    tokenizer = tokenizer_lib.load(tokenizer_from)
  with open(os.path.join(output, 'config.json'), 'w') as f:
    json.dump(hf_config_from_model(config, tokenizer), f, indent=2)
  if tokenizer_from:
    copy_tokenizer(tokenizer_from, output)


def write_peft(config: model_lib.ModelConfig, params, output: str) -> None:
  """A LoRA run's adapters as Hugging Face PEFT reads them: adapter_config.json and
  adapter_model.safetensors (lora_A [rank, in], lora_B [out, rank] per projection)."""
  from safetensors.numpy import save_file
  if os.path.exists(output) and os.listdir(output):
    raise UserError(f'{output} is not empty; choose an empty --output.')
  os.makedirs(output, exist_ok=True)
  arrays, tensors = params.to_pure_dict(), {}
  for path, layer, name in hf_names(config):
    if path[0] != 'layers' or path[-1] not in config.lora.targets:
      continue
    node = arrays['layers'][path[1]]
    a = np.asarray(node[f'{path[-1]}_lora_a'][layer], np.float32)  # [*in, rank]
    b = np.asarray(node[f'{path[-1]}_lora_b'][layer], np.float32)  # [rank, *out]
    tensors[f'base_model.model.{name}.lora_A.weight'] = np.ascontiguousarray(
        a.reshape(-1, a.shape[-1]).T)
    tensors[f'base_model.model.{name}.lora_B.weight'] = np.ascontiguousarray(
        b.reshape(b.shape[0], -1).T)
  save_file(tensors, os.path.join(output, 'adapter_model.safetensors'), metadata={'format': 'pt'})
  modules = sorted(
      {LAYER_NAMES[path].split('.')[-1] for path in LAYER_NAMES if path[-1] in config.lora.targets})
  adapter_config = {
      'peft_type': 'LORA',
      'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': None,
      'r': config.lora.rank,
      'lora_alpha': config.lora.alpha,
      'target_modules': modules,
      'lora_dropout': 0.0,
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'use_dora': False,
      'inference_mode': True,
  }
  with open(os.path.join(output, 'adapter_config.json'), 'w') as f:
    json.dump(adapter_config, f, indent=2)


def merge_lora(config: model_lib.ModelConfig, params):
  """(config, float32 parameters) of the plain model whose weights hold the adapters'
  updates W + alpha/rank A B (params as read_orbax gives them: float32)."""
  return dataclasses.replace(config, lora=lora.LoRAConfig()), lora.merge(params, config.lora)


flags.DEFINE_enum('source', None, ['hf', 'meta', 'orbax'], 'What --input holds.')
flags.DEFINE_string('input', None, 'The folder to convert (only read).')
flags.DEFINE_string('output', None, 'An empty or new folder to write.')
flags.DEFINE_integer('step', None, 'With --source=orbax: the step (default: the newest).')
flags.DEFINE_bool('merge_lora', False, 'With --source=orbax: fold a LoRA run\'s adapters into '
                  'the weights.')
flags.DEFINE_bool('peft', False,
                  'With --source=orbax: write a LoRA run\'s adapters in PEFT format.')
flags.DEFINE_enum('to', 'hf', ['hf', 'orbax'], 'With --source=orbax: the format written.')


def convert_orbax(input_dir: str, step: int | None, output: str, *, merge: bool, peft: bool,
                  to: str) -> None:
  """--source=orbax: a workdir to Hugging Face (or, merged, Orbax) weights or PEFT adapters."""
  config, params = read_orbax(input_dir, step)
  if (merge or peft) and not config.lora.rank:
    raise UserError(f'{input_dir} was trained without LoRA adapters (its model.lora.rank is 0), '
                    'so there is nothing to merge or export; drop --merge_lora / --peft.')
  if merge and peft:
    raise UserError('--merge_lora and --peft write different things; give one of them.')
  if peft:
    return write_peft(config, params, output)
  if config.lora.rank and not merge:
    raise UserError(f'{input_dir} holds LoRA adapters; add --merge_lora to write the merged '
                    'model, or --peft to write the adapters.')
  if merge:
    config, params = merge_lora(config, params)
  (write_orbax if to == 'orbax' else write_hf)(config, params, output,
                                               tokenizer_from=os.path.join(input_dir, 'tokenizer'))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  try:
    if FLAGS.source == 'orbax':
      convert_orbax(FLAGS.input, FLAGS.step, FLAGS.output, merge=FLAGS.merge_lora, peft=FLAGS.peft,
                    to=FLAGS.to)
    else:
      read = read_hf if FLAGS.source == 'hf' else read_meta
      write_orbax(*read(FLAGS.input), FLAGS.output, tokenizer_from=FLAGS.input)
  except UserError as error:
    sys.exit(f'error: {error}')
  print(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['source', 'input', 'output'])
  app.run(main)
