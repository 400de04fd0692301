"""LoRA: an adapted model starts as its base, trains only its adapters, resumes exactly."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import convert
from llama_jax import experiment as experiment_lib
from llama_jax import lora
from llama_jax import model as model_lib
from llama_jax import steps
from llama_jax import train_loop
from llama_jax.errors import ConfigError, UserError

BASE = model_lib.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                             multiple_of=16, max_seq_len=32, dtype='float32', attention='reference')
ADAPTED = dataclasses.replace(BASE, lora=lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.TARGETS))


@pytest.fixture(scope='module')
def text_dir(corpus_dirs):
  return corpus_dirs[0]


@pytest.fixture(scope='module')
def data_dir(corpus_dirs):
  return corpus_dirs[1]


def _adapted_on(base_params, config, seed=1):
  """The adapted model holding `base_params` and freshly initialized adapters."""
  adapted = model_lib.Transformer(config, rngs=nnx.Rngs(seed))
  graphdef, adapters, _ = nnx.split(adapted, lora.Adapter, nnx.Param)
  return nnx.merge(graphdef, adapters, base_params), adapters


def test_with_b_zero_the_adapted_model_is_its_base_exactly():
  base = model_lib.Transformer(BASE, rngs=nnx.Rngs(0))
  adapted, adapters = _adapted_on(nnx.state(base, nnx.Param), ADAPTED)
  names = {'/'.join(map(str, path)) for path, _ in nnx.to_flat_state(adapters)}
  assert len(names) == 2 * len(lora.TARGETS)  # A and B of every projection, stacked
  assert all(leaf.shape[0] == BASE.n_layers for leaf in jax.tree.leaves(adapters))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, BASE.vocab_size)
  np.testing.assert_array_equal(adapted(tokens)[0], base(tokens)[0])


def test_the_update_is_the_low_rank_product_of_each_projection():
  """y = x W + alpha/rank x A B: the adapted model equals its base with every W merged."""
  base = model_lib.Transformer(BASE, rngs=nnx.Rngs(0))
  adapted, adapters = _adapted_on(nnx.state(base, nnx.Param), ADAPTED)
  rng = np.random.default_rng(0)
  for path, variable in nnx.to_flat_state(nnx.state(adapted, lora.Adapter)):
    if path[-1].endswith('_lora_b'):  # non-zero B so that the update shows
      variable.set_value(jnp.asarray(rng.normal(0, 0.1, variable.shape), jnp.float32))
  merged = lora.merge(nnx.state(adapted, nnx.Param), ADAPTED.lora)
  # an independent formula per weight: W + scale * einsum over the flattened in/out axes
  for path, variable in nnx.to_flat_state(nnx.state(base, nnx.Param)):
    a = _get(nnx.state(adapted, nnx.Param), (*path[:-1], f'{path[-1]}_lora_a'))
    if a is None:
      continue
    b = np.asarray(_get(nnx.state(adapted, nnx.Param), (*path[:-1], f'{path[-1]}_lora_b')))
    a = np.asarray(a)
    w = np.asarray(variable[...], np.float64)
    update = np.einsum('lir,lro->lio', a.reshape(a.shape[0], -1, a.shape[-1]),
                       b.reshape(b.shape[0], b.shape[1], -1))
    np.testing.assert_allclose(np.asarray(_get(merged, path)),
                               w + ADAPTED.lora.scale * update.reshape(w.shape), rtol=1e-6,
                               atol=1e-6)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, BASE.vocab_size)
  merged_model = nnx.merge(nnx.split(base, nnx.Param)[0], merged)
  np.testing.assert_allclose(merged_model(tokens)[0], adapted(tokens)[0], atol=1e-5, rtol=0)
  assert not np.allclose(merged_model(tokens)[0], base(tokens)[0], atol=1e-3)


def _get(state, path):
  flat = dict(nnx.to_flat_state(state))
  return flat[path][...] if path in flat else None


def test_bad_targets_are_one_sentence():
  with pytest.raises(ConfigError, match=r"model.lora.targets \['wq', 'query'\] must be"):
    lora.LoRAConfig(rank=4, targets=('wq', 'query'))
  with pytest.raises(ConfigError, match='model.lora.rank must be'):
    lora.LoRAConfig(rank=-1)
  model = ml_collections.ConfigDict(dataclasses.asdict(BASE))  # as a config states it
  model.lora.update(dict(rank=4, targets=('wq', 'query')))
  with pytest.raises(ConfigError, match=r"model.lora.targets \['wq', 'query'\] must be"):
    model_lib.ModelConfig.from_config(model)


def _lora_config(small_config, text_dir, data_dir, base_dir, **overrides):
  config = small_config(text_dir, data_dir, **{'train.eval_every': 10, **overrides})
  config.model.lora.update(dict(rank=4, alpha=8.0, targets=('wq', 'wv', 'w2')))
  config.optim.learning_rate = 1e-2
  config.checkpoint.init_params = base_dir
  return config


def test_only_adapters_train_and_have_optimizer_state(text_dir, data_dir, tmp_path, small_config):
  config = _lora_config(small_config, text_dir, data_dir, '')
  experiment = experiment_lib.build(config, jax.devices()[:1])
  state = steps.create_sharded_state(0, experiment.model_config, experiment.optimizer,
                                     experiment.shardings)
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.frozen))  # model.dtype
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (8, 33))
  batch = {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'weights': np.ones((8, 32), np.float32),
      'positions': np.broadcast_to(np.arange(32), (8, 32)),
      'segment_ids': np.ones((8, 32), np.int32)
  }
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, experiment.batch_sharding)
  for _ in range(3):
    state, metrics = experiment.train_step(state, batch)
  assert np.isfinite(float(metrics['loss']))
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(a), b)  # the base bitwise unchanged
  adapter_shapes = sorted(leaf.shape for leaf in jax.tree.leaves(state.params))
  trained_names = {path[-1] for path, _ in nnx.to_flat_state(state.params)}
  assert trained_names == {f'{t}_lora_{f}' for t in ('wq', 'wv', 'w2') for f in 'ab'}
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  assert sorted(leaf.shape for leaf in moments) == sorted(adapter_shapes * 2)  # Adam mu and nu
  assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(state.params))


def test_bfloat16_base_is_stored_in_the_compute_dtype():
  config = dataclasses.replace(ADAPTED, dtype='bfloat16')
  optimizer = optax.adam(1e-3)
  abstract = steps.abstract_state(config, optimizer)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('rank', [0, 4])  # full fine-tuning and LoRA on a frozen base
def test_a_fine_tune_keeps_its_checkpoints_norm_epsilon_and_rope(tmp_path, small_config, rank):
  """norm_eps, rope_theta, rope_scaling of checkpoint.init_params that differ from the run's
  are one sentence naming each key, both values and the setting that matches, before any
  data or compile; the rotary ones may change on purpose with checkpoint.allow_new_rope."""
  config = small_config('', str(tmp_path / 'tfds'), **{'checkpoint.init_params': str(tmp_path)})
  config.model.lora.rank = rank
  run = model_lib.ModelConfig.from_config(config.model)
  trained = dataclasses.replace(run, norm_eps=1e-5, rope_theta=5e5, lora=lora.LoRAConfig())
  convert.write_orbax(trained, nnx.state(model_lib.Transformer(trained, rngs=nnx.Rngs(0)),
                                         nnx.Param), str(tmp_path))
  workdir = tmp_path / 'run'
  with pytest.raises(
      UserError, match=re.escape(
          f'checkpoint.init_params {tmp_path} was trained with model.norm_eps=1e-05, '
          'model.rope_theta=500000.0 but this run has 1e-06, 10000.0; set model.norm_eps=1e-05, '
          'model.rope_theta=500000.0 to fine-tune it as it was trained (or '
          'checkpoint.allow_new_rope=True to change its rotary embedding on purpose')):
    train_loop.train(config, str(workdir))
  assert not (workdir / 'checkpoints').exists() and not (tmp_path / 'tfds').exists()
  config.model.norm_eps, config.model.rope_theta = 1e-5, 5e5
  config.model.rope_scaling = {'type': 'linear', 'factor': 4.0}
  with pytest.raises(
      UserError, match=re.escape("model.rope_scaling=None but this run has "
                                 "{'factor': 4.0, 'type': 'linear'}; set "
                                 'model.rope_scaling=None to')):
    train_loop.check_init_model(config, model_lib.ModelConfig.from_config(config.model))
  config.checkpoint.allow_new_rope = True  # context extension: a new rope on these weights
  train_loop.check_init_model(config, model_lib.ModelConfig.from_config(config.model))
  config.model.norm_eps = 1e-6
  with pytest.raises(
      UserError, match=r'model.norm_eps=1e-05 but this run has 1e-06; set '
      r'model.norm_eps=1e-05 to fine-tune it as it was trained\.$'):
    train_loop.check_init_model(config, model_lib.ModelConfig.from_config(config.model))


def _checkpoint_items(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  return manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), base=ocp.args.JsonRestore()))


@pytest.mark.slow
def test_lora_run_saves_adapters_resumes_exactly_and_refuses_another_base(
    text_dir, data_dir, tmp_path, small_config, losses):
  base, other_base = str(tmp_path / 'base'), str(tmp_path / 'other_base')
  for workdir, seed in ((base, 0), (other_base, 1)):
    train_loop.train(
        small_config(text_dir, data_dir, **{
            'train.steps': 2,
            'train.eval_every': 0,
            'train.seed': seed
        }), workdir)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train_loop.train(_lora_config(small_config, text_dir, data_dir, base), straight)
  train_loop.train(_lora_config(small_config, text_dir, data_dir, base, **{'train.steps': 10}),
                   resumed)
  train_loop.train(_lora_config(small_config, text_dir, data_dir, base), resumed)
  want, got = losses(straight), losses(resumed)
  assert [got[s] for s in range(11, 21)] == [want[s] for s in range(11, 21)]  # bitwise
  assert want[20] < want[1]

  items = _checkpoint_items(straight, 20)
  assert items.base == {'directory': os.path.join(base, 'checkpoints'), 'step': 2}
  names = [path for path, _ in jax.tree_util.tree_flatten_with_path(items.params)[0]]
  assert names and all(
      '_lora_' in str(path[-2]) for path in names)  # no base weight in the train checkpoint
  for a, b in zip(jax.tree.leaves(items.params),
                  jax.tree.leaves(_checkpoint_items(resumed, 20).params)):
    np.testing.assert_array_equal(a, b)

  before = sorted(os.listdir(os.path.join(straight, 'checkpoints')))
  with pytest.raises(
      UserError, match='the adapters in .* apply to the base .*base/checkpoints '
      'step 2, not to .*other_base/checkpoints step 2'):
    train_loop.train(
        _lora_config(small_config, text_dir, data_dir, other_base, **{'train.steps': 30}), straight)
  assert sorted(os.listdir(os.path.join(straight, 'checkpoints'))) == before
  no_base = _lora_config(small_config, text_dir, data_dir, '')
  with pytest.raises(UserError, match='set checkpoint.init_params'):
    train_loop.train(no_base, str(tmp_path / 'no_base'))


def _lora_run_on(base_dir, workdir, targets, seed=0, dtype='float32'):
  """A LoRA run's checkpoint (non-zero adapters on the converted base in `base_dir`), written
  the way train.py writes one; returns the adapted model it holds."""
  base_config, base_params = convert.read_orbax(base_dir)
  config = dataclasses.replace(base_config, attention='reference', dtype=dtype,
                               lora=lora.LoRAConfig(rank=4, alpha=8.0, targets=targets))
  state = steps.init_state(seed, model_config=config, optimizer=optax.adam(1e-3))
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape), jnp.float32),
                          state.params)
  state = state.replace(params=adapters)
  manager = checkpoint_lib.make_manager(
      os.path.join(workdir, 'checkpoints'),
      ml_collections.ConfigDict(dict(keep=1, keep_period=0, async_save=False)))
  base = {'directory': checkpoint_lib.absolute(os.path.join(base_dir, 'checkpoints')), 'step': 0}
  checkpoint_lib.save(manager, 7, state, 0, [], {'model': dataclasses.asdict(config)}, base)
  manager.wait_until_finished()
  manager.close()
  adapted = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  nnx.update(adapted, nnx.merge_state(adapters, base_params))
  return adapted


@pytest.mark.parametrize('targets', [('wq', 'wk', 'wv', 'wo'), lora.TARGETS])
def test_peft_export_and_merged_weights_give_the_adapted_logits(tmp_path, make_hf_model, targets):
  import peft
  import torch
  import transformers
  make_hf_model(tmp_path / 'hf', n_kv_heads=2)
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'base'))
  adapted = _lora_run_on(str(tmp_path / 'base'), str(tmp_path / 'run'), targets)
  ids = np.random.default_rng(0).integers(0, 102, (2, 24))
  ours = np.asarray(adapted(ids)[0])

  options = dict(merge=False, peft=True, to='hf')
  convert.convert_orbax(str(tmp_path / 'run'), None, str(tmp_path / 'peft'), **options)
  hf_base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
  with torch.no_grad():
    base_logits = hf_base(torch.tensor(ids)).logits.numpy()
    with_adapters = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / 'peft')).eval()
    peft_logits = with_adapters(torch.tensor(ids)).logits.numpy()
  assert np.abs(peft_logits - base_logits).max() > 1e-2  # the adapters change the logits
  np.testing.assert_allclose(ours, peft_logits, atol=1e-4, rtol=0)

  for to in ('hf', 'orbax'):
    convert.convert_orbax(str(tmp_path / 'run'), None, str(tmp_path / f'merged_{to}'), merge=True,
                          peft=False, to=to)
  config, params = convert.read_orbax(str(tmp_path / 'merged_orbax'))
  assert config.lora.rank == 0 and not nnx.to_flat_state(
      nnx.split_state(params, lora.Adapter, ...)[0])
  merged = model_lib.Transformer(dataclasses.replace(config, attention='reference'),
                                 rngs=nnx.Rngs(0))
  nnx.update(merged, params)
  np.testing.assert_allclose(np.asarray(merged(ids)[0]), ours, atol=1e-5, rtol=0)
  merged_hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'merged_hf')).eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged_hf(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)


def _flat(tree):
  """{'layers/attention/wq': array} of a checkpoint item restored without a target."""
  return {
      '/'.join(str(getattr(k, 'key', k)) for k in path if getattr(k, 'key', k) != 'value'): leaf for
      path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def test_merge_is_float32_from_the_stored_base_of_a_bfloat16_run(tmp_path):
  """A run computing in bfloat16 holds its base in bfloat16; --merge_lora still writes float32
  weights equal to W + alpha/rank A B computed in float64 from the stored float32 base."""
  from safetensors import safe_open
  base = nnx.state(model_lib.Transformer(BASE, rngs=nnx.Rngs(0)), nnx.Param)
  convert.write_orbax(BASE, base, str(tmp_path / 'base'))
  _lora_run_on(str(tmp_path / 'base'), str(tmp_path / 'run'), lora.TARGETS, dtype='bfloat16')
  stored = _flat(_checkpoint_items(str(tmp_path / 'run'), 7).params)  # the adapters, as saved
  want = {}
  for path, variable in nnx.to_flat_state(base):
    name = '/'.join(map(str, path))
    w = np.asarray(variable[...], np.float64)
    if f'{name}_lora_a' in stored:
      a = np.asarray(stored[f'{name}_lora_a'], np.float64)  # [layers, *in, rank]
      b = np.asarray(stored[f'{name}_lora_b'], np.float64)  # [layers, rank, *out]
      update = np.einsum('lir,lro->lio', a.reshape(a.shape[0], -1, a.shape[-1]),
                         b.reshape(b.shape[0], b.shape[1], -1))
      w = w + ADAPTED.lora.scale * update.reshape(w.shape)
    want[name] = w
  assert len(want) > len(lora.TARGETS)

  convert.convert_orbax(str(tmp_path / 'run'), None, str(tmp_path / 'orbax'), merge=True,
                        peft=False, to='orbax')
  manager = ocp.CheckpointManager(str(tmp_path / 'orbax' / 'checkpoints'))
  restored = manager.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  merged = _flat(restored.params)
  assert sorted(merged) == sorted(want)
  for name, w in want.items():
    assert merged[name].dtype == np.float32, name
    np.testing.assert_allclose(merged[name], w, rtol=2e-7, atol=1e-7, err_msg=name)

  convert.convert_orbax(str(tmp_path / 'run'), None, str(tmp_path / 'hf'), merge=True, peft=False,
                        to='hf')
  for path in (tmp_path / 'hf').glob('*.safetensors'):
    with safe_open(str(path), 'np') as f:
      assert {f.get_tensor(key).dtype for key in f.keys()} == {np.dtype(np.float32)}
  _, hf_params = convert.read_hf(str(tmp_path / 'hf'))
  for path, variable in nnx.to_flat_state(hf_params):
    np.testing.assert_allclose(variable[...], want['/'.join(map(str, path))], rtol=2e-7, atol=1e-7)


def test_export_errors_are_one_sentence(tmp_path, make_hf_model):
  make_hf_model(tmp_path / 'hf', n_kv_heads=2)
  convert.write_orbax(*convert.read_hf(str(tmp_path / 'hf')), str(tmp_path / 'base'))
  with pytest.raises(UserError, match='was trained without LoRA adapters'):
    convert.convert_orbax(str(tmp_path / 'base'), None, str(tmp_path / 'out'), merge=True,
                          peft=False, to='hf')
  _lora_run_on(str(tmp_path / 'base'), str(tmp_path / 'run'), ('wq',))
  with pytest.raises(UserError, match='add --merge_lora'):
    convert.convert_orbax(str(tmp_path / 'run'), None, str(tmp_path / 'out'), merge=False,
                          peft=False, to='hf')
  assert not os.path.exists(tmp_path / 'out')
  os.rename(tmp_path / 'base', tmp_path / 'moved')
  with pytest.raises(UserError, match='apply to the base checkpoint .*, which is gone'):
    convert.read_orbax(str(tmp_path / 'run'))
