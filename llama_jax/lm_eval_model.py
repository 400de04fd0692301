"""lm-evaluation-harness's own command line on our checkpoints: the model `llama_jax`.

  python -m llama_jax.lm_eval_model --model llama_jax \
      --model_args workdir=W[,step=N,bfloat16=True] --tasks piqa [any other lm_eval flag]

lm-eval (0.4.13) finds a model only in its registry: it has no entry points or plugin
path for models from other packages, so `llama_jax` is registered when this module is
imported (Python: `import llama_jax.lm_eval_model`, then `lm_eval.simple_evaluate(
model='llama_jax', model_args='workdir=W', ...)`); run as above, it is lm_eval's CLI.
"""

import sys

import jax
from lm_eval import utils as harness_utils
from lm_eval.api import registry

from configs import default
from llama_jax import checkpoint as checkpoint_lib
from llama_jax import evaluation
from llama_jax import experiment as experiment_lib
from llama_jax import harness
from llama_jax import sharding as sharding_lib
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.errors import ConfigError, UserError

ARGUMENTS = ('workdir', 'step', 'bfloat16')


def restore(workdir: str, step: int | None = None, bfloat16: bool = False):
  """(model, tokenizer) of checkpoint `step` (default: the newest) of a train.py workdir or a
  llama_jax.convert output, on all devices (as eval.py restores it)."""
  directory = checkpoint_lib.directory_of(workdir, '')
  config, step = evaluation.load_config(directory, step, {}, default.get_config())
  devices = jax.devices()
  try:
    sharding_lib.mesh_shape(config.mesh, len(devices))
  except ConfigError:
    config.mesh.update(dict(data=1, fsdp=-1, sequence=1, tensor=1))  # the writer's mesh
  experiment = experiment_lib.build(config, devices)
  params = evaluation.restore_params(directory, step, experiment.model_config,
                                     experiment.params_shardings, bfloat16)
  tokenizer = tokenizer_lib.for_data(config.data, config.model.vocab_size, checkpoints=(workdir,))
  return evaluation.model_of(params, config), tokenizer


@registry.register_model('llama_jax')
class LlamaJaxLM(harness.HarnessModel):
  """HarnessModel restored from `--model_args workdir=W[,step=N,bfloat16=True]`."""
  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    unknown = sorted(set(arg_dict) - set(ARGUMENTS))
    if 'workdir' not in arg_dict or unknown:
      raise UserError(f'--model_args for llama_jax take workdir=W[,step=N,bfloat16=True]; got '
                      f'{", ".join(f"{k}={v}" for k, v in arg_dict.items()) or "none"}.')
    batch_size = (additional_config or {}).get('batch_size')
    batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # 'auto' or none: 16
    model, tokenizer = restore(str(arg_dict['workdir']), arg_dict.get('step'),
                               bool(arg_dict.get('bfloat16', False)))
    return cls(model, tokenizer, batch_size)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(harness_utils.simple_parse_args_string(arg_string),
                                   additional_config)


def main():
  from lm_eval.__main__ import cli_evaluate
  try:
    cli_evaluate()
  except UserError as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  main()
