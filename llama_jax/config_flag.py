"""The --config flag of every entry point: an ml_collections config file and its
--config.group.key=value overrides, where every mistake is one line and exit status 2.

An entry point defines its other flags, then starts with `run` instead of `app.run`:

  from llama_jax import config_flag

  def main(argv):
    config = flags.FLAGS.config  # the ConfigDict, overrides applied
    ...

  if __name__ == '__main__':
    config_flag.run(main, 'configs/tiny.py', 'Config file (ml_collections).')

Before absl parses the command line, `run` loads the config file (the --config on it, else
the default) and checks that every override names a key of it; a missing or broken file or
an unknown key prints one `error: ...` line (with the closest keys) and exits with status 2.
Then ml_collections' DEFINE_config_file defines the flag and absl parses as usual (a value
of the wrong type stays absl's one-line `FATAL Flags parsing error`).
"""

import difflib
import importlib.util
import os
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from llama_jax.errors import UserError

NAME = 'config'


def run(main, default: str, help_string: str):
  """Defines --config (`default`: a config file path) and runs `main` with absl's app.run."""
  def parse(argv):
    try:
      check_command_line(flags.FLAGS.read_flags_from_files(argv, force_gnu=False), default)
    except (UserError, flags.Error) as error:  # flags.Error: an unreadable --flagfile
      print(f'error: {error}', file=sys.stderr)
      sys.exit(2)
    holder = config_flags.DEFINE_config_file(NAME, default, help_string)
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])  # in --help
    return app.parse_flags_with_usage(argv)

  app.run(main, flags_parser=parse)


def check_command_line(argv: list[str], default: str):
  """Raises UserError unless the config file loads and every override names one of its keys."""
  path, overrides = default, []
  for i, arg in enumerate(argv[1:], 1):
    if match := re.match(rf'-{{1,2}}{NAME}(=|$)', arg):
      path = arg[match.end():] if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
    elif match := re.match(rf'-{{1,2}}(no)?{NAME}\.([^=]+)', arg):
      overrides.append(match.group(2))
  config = load(path)
  for override in overrides:
    holder, key = holder_of(config, override)
    if key not in holder:
      raise _no_key(override, override.rpartition('.')[0], key, holder)


def load(path: str):
  """get_config() of the config file at `path` (`FILE:ARG` passes ARG, as ml_collections does)."""
  file, *args = path.split(':', 1)
  where = f'--{NAME}={path}'
  if not os.path.isfile(file):
    raise UserError(f'{where}: no such config file')
  spec = importlib.util.spec_from_file_location(f'{NAME}_file', file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as error:
    raise UserError(f'{where}: syntax error at line {error.lineno} ({error.msg})') from None
  except Exception as error:
    raise UserError(f'{where}: running it raised {_one_line(error)}') from None
  if not hasattr(module, 'get_config'):
    raise UserError(f'{where}: the file defines no get_config(); a config file returns its '
                    'ConfigDict from get_config() (see configs/tiny.py)')
  try:
    config = module.get_config(*args)
  except Exception as error:
    raise UserError(f'{where}: get_config() raised {_one_line(error)}') from None
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise UserError(f'{where}: get_config() returned a {type(config).__name__}, not a ConfigDict')
  return config


def holder_of(config, override: str):
  """(the group that holds the override's last key, that key): 'train.batch_size' gives
  (config.train, 'batch_size'). Raises UserError when a group on the way does not exist."""
  *groups, key = override.split('.')
  holder = config
  for depth, name in enumerate(groups):
    if name not in holder:
      raise _no_key(override, '.'.join(groups[:depth]), name, holder)
    holder = holder[name]
    if not isinstance(holder, (ml_collections.ConfigDict, dict)):
      raise UserError(f'--{NAME}.{override}: {NAME}.{".".join(groups[:depth + 1])} is a '
                      f'value ({type(holder).__name__}), not a group of keys')
  return holder, key


def apply(config, overrides: dict):
  """Sets each override ({'group.key': value}) in `config`: eval.py's onto the config saved in
  a checkpoint. A group the config lacks is a UserError; a missing last key is added."""
  for override, value in overrides.items():
    holder, key = holder_of(config, override)
    holder[key] = value


def _no_key(override: str, group: str, key: str, holder) -> UserError:
  """The sentence for a key that `holder` (config.GROUP) lacks, with the closest it has."""
  keys = list(holder.keys())
  close = difflib.get_close_matches(key, keys, n=3)
  hint = (f'did you mean {" or ".join(close)}?'
          if close else f'it has {", ".join(keys)}' if keys else 'it has no keys')
  where = f'{NAME}.{group}' if group else NAME
  return UserError(f'--{NAME}.{override}: no key {key} in {where}; {hint}')


def _one_line(error: Exception) -> str:
  return f'{type(error).__name__}: {" ".join(str(error).split())}'
