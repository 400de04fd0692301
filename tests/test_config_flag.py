"""--config mistakes through the real command line: one line, exit status 2, no traceback."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import llama_7b
from llama_jax import config_flag
from llama_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPO = ('error: --config.train.bacth_size: no key bacth_size in config.train; '
        'did you mean batch_size?')


def run(*args):
  """(exit status, stderr) of `python ARGS` in the repository root; no traceback anywhere."""
  done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert 'Traceback' not in done.stdout + done.stderr, done.stderr[-3000:]
  return done.returncode, done.stderr.strip()


@pytest.mark.parametrize('entry_point', [
    ['train.py', '--workdir=runs/never_written'],
    ['eval.py', '--workdir=runs/never_written'],
    ['-m', 'llama_jax.aot', '--topology=v5p-8'],
    ['-m', 'benchmarks.train_step'],
])
def test_every_entry_point_names_a_mistyped_key(entry_point):
  """Each checks the overrides against its default config before anything else runs."""
  assert run(*entry_point, '--config.train.bacth_size=4') == (2, TYPO)
  assert not os.path.exists(os.path.join(REPO, 'runs/never_written'))


SYNTAX_ERROR = 'def get_config(:\n  pass\n'
TRAIN_DEFAULT = 'configs/tiny.py'  # train.py's --config default


@pytest.mark.parametrize('args,message', [
    (['--config=configs/tiny.py', '--config.train.bacth_size=4'], TYPO),
    (['--config', 'configs/tiny.py', '--noconfig.model.scan_layer'
     ], 'error: --config.model.scan_layer: no key scan_layer in config.model; '
     'did you mean scan_layers or n_layers?'),
    (['--config.trian.steps=1'
     ], 'error: --config.trian.steps: no key trian in config; did you mean train?'),
    (['--config.train.batch_size.x=1'], 'error: --config.train.batch_size.x: '
     'config.train.batch_size is a value (int), not a group of keys'),
    (['--config=configs/nope.py'], 'error: --config=configs/nope.py: no such config file'),
    (['--config=configs/llama_data.py'
     ], 'error: --config=configs/llama_data.py: the file defines no get_config(); a config file '
     'returns its ConfigDict from get_config() (see configs/tiny.py)'),
    (['--config={tmp}/broken.py'
     ], 'error: --config={tmp}/broken.py: syntax error at line 1 (invalid syntax)'),
])
def test_config_mistakes_are_one_line(args, message, tmp_path, monkeypatch):
  """The check train.py runs before absl parses (`config_flag.run` prints the sentence and
  exits 2, as the entry-point tests above and below see through the real command line)."""
  monkeypatch.chdir(REPO)
  (tmp_path / 'broken.py').write_text(SYNTAX_ERROR)
  args = [arg.format(tmp=tmp_path) for arg in args]
  with pytest.raises(UserError) as error:
    config_flag.check_command_line(['train.py', f'--workdir={tmp_path}/run', *args], TRAIN_DEFAULT)
  assert f'error: {error.value}' == message.format(tmp=tmp_path)


def test_a_config_file_mistake_through_train_py_is_one_line_and_exit_2(tmp_path):
  (tmp_path / 'broken.py').write_text(SYNTAX_ERROR)
  assert run('train.py', f'--workdir={tmp_path}/run', f'--config={tmp_path}/broken.py') == (
      2, f'error: --config={tmp_path}/broken.py: syntax error at line 1 (invalid syntax)')
  assert not os.path.exists(tmp_path / 'run')


def test_overrides_apply_to_a_saved_config_through_nested_groups():
  """eval.py's overrides onto the config of a checkpoint (here the 7B config as saved)."""
  config = ml_collections.ConfigDict(llama_7b.get_config().to_dict())  # as load_config reads it
  del config.train['z_loss']  # saved before the key existed
  config_flag.apply(config, {'data.mixture.c4.weight': 2.0, 'train.z_loss': 1e-4})
  assert config.data.mixture.c4.weight == 2.0 and config.train.z_loss == 1e-4
  with pytest.raises(UserError) as error:
    config_flag.apply(config, {'data.mixture.githb.weight': 1.0})
  message = str(error.value)
  assert message == ('--config.data.mixture.githb.weight: no key githb in config.data.mixture; '
                     'did you mean github?')
