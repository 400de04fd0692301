"""train.py end to end on the CPU: learning, exact resume, other meshes, two processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax import checkpoint as checkpoint_lib
from llama_jax import model as model_lib
from llama_jax import train_loop
from llama_jax.errors import ConfigError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def text_dir(corpus_dirs):
  return corpus_dirs[0]


@pytest.fixture(scope='module')
def data_dir(corpus_dirs):
  return corpus_dirs[1]


@pytest.mark.slow
def test_loss_decreases_on_the_builtin_corpus(tmp_path, losses):
  """The real default as a user runs it: `python train.py` on one CPU device, the tiny
  config on the Python stdlib, 50 steps."""
  overrides = {
      'train.steps': 50,
      'train.batch_size': 8,
      'train.eval_every': 0,
      'optim.warmup_steps': 10,
      'data.data_dir': tmp_path / 'tfds',
      'checkpoint.every_steps': 50,
      'logging.every_steps': 5
  }
  command = [sys.executable, 'train.py', f'--workdir={tmp_path / "run"}'
            ] + [f'--config.{key}={value}' for key, value in overrides.items()]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'over 1 cpu devices' in done.stdout + done.stderr
  curve = losses(str(tmp_path / 'run'))
  assert curve[50] < curve[5] - 1.5, curve
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    row = json.loads(f.readline())
  assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_s', 'tflops_per_device'} <= set(row)
  assert 'mfu' not in row  # no peak FLOP/s is known for a CPU unless configured
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'run' / 'tensorboard'))


@pytest.mark.slow
def test_resume_is_exact_and_works_on_another_mesh(text_dir, data_dir, tmp_path, small_config,
                                                   losses, final_params):
  straight, resumed, other_mesh = (str(tmp_path / name) for name in ('a', 'b', 'c'))
  train_loop.train(small_config(text_dir, data_dir), straight)
  train_loop.train(small_config(text_dir, data_dir, **{'train.steps': 10}), resumed)
  train_loop.train(small_config(text_dir, data_dir), resumed)
  want, got = losses(straight), losses(resumed)
  assert [got[s] for s in range(11, 21)] == [want[s] for s in range(11, 21)]  # bitwise
  for a, b in zip(final_params(resumed, 20), final_params(straight, 20)):
    np.testing.assert_array_equal(a, b)

  train_loop.train(small_config(text_dir, data_dir, **{'train.steps': 10}), other_mesh)
  mesh = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  train_loop.train(small_config(text_dir, data_dir, **mesh), other_mesh)
  other = losses(other_mesh)
  np.testing.assert_allclose([other[s] for s in range(11, 21)], [want[s] for s in range(11, 21)],
                             rtol=2e-4)


@pytest.mark.slow
def test_tied_embeddings_learn_and_resume_exactly(text_dir, data_dir, tmp_path, small_config,
                                                  losses, final_params):
  """Llama 3.2's tied input/output embeddings, with scaled rope and loss chunks."""
  tied = {
      'model.tie_embeddings': True,
      'model.rope_scaling': dict(type='llama3', factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=16),
      'train.loss_chunks': 4,
  }
  straight, resumed = str(tmp_path / 'a'), str(tmp_path / 'b')
  train_loop.train(small_config(text_dir, data_dir, **tied), straight)
  train_loop.train(small_config(text_dir, data_dir, **tied, **{'train.steps': 10}), resumed)
  train_loop.train(small_config(text_dir, data_dir, **tied), resumed)
  want, got = losses(straight), losses(resumed)
  assert want[20] < want[1] - 0.5, want
  assert [got[s] for s in range(11, 21)] == [want[s] for s in range(11, 21)]  # bitwise
  for a, b in zip(final_params(resumed, 20), final_params(straight, 20)):
    np.testing.assert_array_equal(a, b)
  names = checkpoint_lib.saved_param_names(os.path.join(straight, 'checkpoints'), 20)
  assert names == {'embedding', 'layers', 'norm'}  # one table: no separate output matrix


@pytest.mark.slow
def test_two_processes_train_together(text_dir, data_dir, tmp_path, small_config, losses,
                                      train_command, pod):
  """Two processes x 4 CPU devices over loopback, then one process resumes their checkpoint."""
  workdir = str(tmp_path / 'two')
  command = train_command(text_dir, data_dir, workdir, **{
      'train.steps': 4,
      'train.eval_every': 0,
      'checkpoint.every_steps': 4
  })
  pod.finish(pod.launch(command, tmp_path / 'logs'), timeout=600)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))

  # The same 4 steps in one process on 8 devices give the same losses ...
  single = str(tmp_path / 'one')
  config = small_config(text_dir, data_dir, **{
      'train.steps': 4,
      'train.eval_every': 0,
      'checkpoint.every_steps': 4
  })
  train_loop.train(config, single)
  two, one = losses(workdir), losses(single)
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                             rtol=1e-5)
  # ... and one process restores the two processes' checkpoint and continues like them.
  config.train.steps = 6
  train_loop.train(config, workdir)
  train_loop.train(config, single)
  np.testing.assert_allclose(losses(workdir)[6], losses(single)[6], rtol=1e-5)


def test_start_up_errors_are_clear_and_touch_nothing(text_dir, data_dir, tmp_path, small_config):
  with pytest.raises(ConfigError, match='mesh.data x mesh.fsdp'):
    train_loop.train(small_config(text_dir, data_dir, **{'train.batch_size': 12}), str(tmp_path))
  with pytest.raises(ConfigError, match='model.n_heads .4. must be divisible by mesh.tensor'):
    train_loop.train(small_config(text_dir, data_dir, **{
        'mesh.tensor': 8,
        'mesh.fsdp': 1
    }), str(tmp_path))
  with pytest.raises(ConfigError, match='needs 6 devices but there are 8'):
    train_loop.train(small_config(text_dir, data_dir, **{
        'mesh.data': 6,
        'mesh.fsdp': 1
    }), str(tmp_path))
  blocker = tmp_path / 'file'
  blocker.write_text('a file where the workdir should be')
  with pytest.raises(UserError, match='cannot write to the workdir'):
    train_loop.train(small_config(text_dir, data_dir), str(blocker / 'run'))

  workdir = str(tmp_path / 'run')
  train_loop.train(small_config(text_dir, data_dir, **{
      'train.steps': 2,
      'train.eval_every': 0
  }), workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  config = small_config(text_dir, data_dir, **{'train.steps': 4})
  config.model.dim = 128
  with pytest.raises(UserError, match='holds a checkpoint of a different model .dim 64 vs 128'):
    train_loop.train(config, workdir)
  config = small_config(text_dir, data_dir, **{'train.steps': 4, 'model.tie_embeddings': True})
  with pytest.raises(UserError, match='tie_embeddings False vs True'):
    train_loop.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before
  # The same SwiGLU width stated another way (as a converted checkpoint states it) resumes.
  config = small_config(text_dir, data_dir, **{'train.steps': 3, 'train.eval_every': 0})
  config.model.multiple_of = model_lib.ModelConfig.from_config(config.model).hidden_dim
  train_loop.train(config, workdir)
  assert '3' in os.listdir(os.path.join(workdir, 'checkpoints'))


@pytest.mark.slow
def test_init_params_starts_from_another_runs_parameters(text_dir, data_dir, tmp_path, small_config,
                                                         final_params):
  source, tuned = str(tmp_path / 'source'), str(tmp_path / 'tuned')
  train_loop.train(small_config(text_dir, data_dir, **{
      'train.steps': 3,
      'train.eval_every': 0
  }), source)
  config = small_config(
      text_dir, data_dir, **{
          'train.steps': 1,
          'train.eval_every': 0,
          'train.seed': 5,
          'optim.learning_rate': 0.0
      })
  config.checkpoint.init_params = source
  train_loop.train(config, tuned)  # learning rate 0: the parameters pass through unchanged
  for a, b in zip(final_params(tuned, 1), final_params(source, 3)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_relative_workdir_as_in_the_quick_start(text_dir, data_dir, tmp_path, monkeypatch,
                                                small_config, losses):
  """`python train.py` defaults to the relative workdir runs/tiny."""
  monkeypatch.chdir(tmp_path)
  config = small_config(text_dir, data_dir, **{'train.steps': 2, 'train.eval_every': 0})
  train_loop.train(config, 'runs/tiny')
  assert os.path.isdir(tmp_path / 'runs' / 'tiny' / 'checkpoints' / '2')
  config.train.steps = 3
  train_loop.train(config, 'runs/tiny')  # and resumes from there
  assert max(losses(str(tmp_path / 'runs' / 'tiny'))) == 3
