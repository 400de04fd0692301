"""Test set-up: 8 simulated CPU devices (before jax is imported), and the helpers that
several test modules share, as fixtures."""

import atexit
import json
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for this session, shared with the train.py / eval.py /
# serve.py processes the tests start: the same small programs compile once, not once per
# process. It starts empty and is deleted at exit (JAX caches only CPU programs here, not
# the TPU and GPU compiles of the topology tests).
_COMPILATION_CACHE = tempfile.mkdtemp(prefix='llama_jax_tests_jit_')
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import importlib  # noqa: E402  (jax reads XLA_FLAGS when it is first imported)
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import portpicker  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return '
         'class import for while 0 1 2 3 42 1999 café naïve 日本 語').split()


def _write_corpus(folder, n_files=60, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(n_files):
    sub = os.path.join(folder, f'pkg{i % 3}')
    os.makedirs(sub, exist_ok=True)
    text = '\n'.join(
        ' '.join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(rng.integers(2, 30)))
    with open(os.path.join(sub, f'file{i}.txt'), 'w', encoding='utf-8') as f:
      f.write(text)
  os.makedirs(os.path.join(folder, 'tests'))  # skipped, like the stdlib's test folders
  with open(os.path.join(folder, 'tests', 'skipped.txt'), 'w') as f:
    f.write('never read')
  with open(os.path.join(folder, 'lines.jsonl'), 'w') as f:
    for i in range(5):
      f.write(json.dumps({'text': f'jsonl document {i}'}) + '\n')


# The small model, batch and schedule, by config group: small_config and train_command's runs
# (in this process and as train.py flags) must be the same computation.
SMALL = {
    'model': dict(dim=64, n_layers=2, n_heads=4, vocab_size=400, max_seq_len=64, dtype='float32'),
    'train': dict(batch_size=8, seq_len=32),
    'optim': dict(warmup_steps=5, decay_steps=20),  # the same schedule when stopped early
    'logging': dict(every_steps=1),
}


def _small_config(text_dir, data_dir, **overrides):
  """The tiny config shrunk further, on the test corpus: seconds per run."""
  config = importlib.import_module('configs.tiny').get_config()
  for group, values in SMALL.items():
    config[group].update(values)
  config.train.update(dict(steps=20, eval_every=10, eval_batches=2))
  config.data.update(dict(text_dir=text_dir, data_dir=data_dir, prefetch=2))
  config.checkpoint.update(dict(every_steps=10, keep=5))
  for key, value in overrides.items():
    group, name = key.split('.')
    config[group][name] = value
  return config


def _metrics_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {row['step']: row['loss'] for row in _metrics_rows(workdir) if 'loss' in row}


def _final_params(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return jax.tree.leaves(restored.params)


@pytest.fixture(scope='session')
def write_corpus():
  """write_corpus(folder, n_files=60, seed=0): random text files, a jsonl and a tests/ folder."""
  return _write_corpus


@pytest.fixture(scope='module')
def corpus_dirs(tmp_path_factory):
  """(text_dir, data_dir): an 80-file corpus and an empty TFDS data dir, per test module."""
  text_dir = str(tmp_path_factory.mktemp('corpus'))
  _write_corpus(text_dir, n_files=80)
  return text_dir, str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def small_config():
  """small_config(text_dir, data_dir, **{'group.key': value}): the tiny config shrunk further."""
  return _small_config


@pytest.fixture(scope='session')
def metrics_rows():
  """metrics_rows(workdir): the rows of the run's metrics.jsonl, in order."""
  return _metrics_rows


@pytest.fixture(scope='session')
def losses():
  """losses(workdir): {step: loss} from the run's metrics.jsonl."""
  return _losses


@pytest.fixture(scope='session')
def final_params():
  """final_params(workdir, step): the checkpoint's parameter arrays, in tree order."""
  return _final_params


def _truncate_largest_file(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)


@pytest.fixture(scope='session')
def truncate_largest_file():
  """truncate_largest_file(folder): damages a checkpoint item (its largest file loses half)."""
  return _truncate_largest_file


# SMALL as train.py flags (the tiny config's other keys stay).
SMALL_MODEL_FLAGS = {
    f'{group}.{key}': value for group, values in SMALL.items() for key, value in values.items()
}


def _train_command(text_dir, data_dir, workdir, **overrides):
  return [sys.executable, 'train.py', f'--workdir={workdir}'] + [
      f'--config.{key}={value}' for key, value in {
          **SMALL_MODEL_FLAGS, 'data.text_dir': text_dir,
          'data.data_dir': data_dir,
          **overrides
      }.items()
  ]


@pytest.fixture(scope='session')
def train_command():
  """train_command(text_dir, data_dir, workdir, **{'group.key': value}): `python train.py`
  with small_config's model as flags (run it from the repository root)."""
  return _train_command


def _make_hf_model(folder, n_kv_heads=4, rope_theta=10000.0, seed=0):
  import torch
  import transformers
  config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=n_kv_heads,
                                    vocab_size=102, rope_theta=rope_theta,
                                    max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
                                    eos_token_id=2)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # weights large enough that a wrong layout shows in the logits
    for name, param in model.named_parameters():
      param.copy_(1 + 0.2 * torch.randn_like(param) if 'norm' in name else 0.15 *
                  torch.randn_like(param))
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope='session')
def make_hf_model():
  """make_hf_model(folder, n_kv_heads=4, rope_theta=1e4, seed=0): a small random Hugging
  Face LlamaForCausalLM (vocab 102, weights large enough to show a wrong layout), saved in
  `folder`."""
  return _make_hf_model


class Processes:
  """Several train.py processes x 4 CPU devices joined over loopback (a simulated pod)."""
  @staticmethod
  def launch(command, logs, processes=2):
    """Starts `command` on `processes` processes; their output goes to files in `logs` (a pipe
    that nobody drains would block a chatty process while the others wait for it)."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu')
    port = portpicker.pick_unused_port()
    logs.mkdir(exist_ok=True)
    running = []
    for i in range(processes):
      log = open(logs / f'{len(list(logs.iterdir()))}.txt', 'w+')
      process = subprocess.Popen(
          command + [
              f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
              f'--process_id={i}'
          ], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
      process.log = log
      running.append(process)
    return running

  @staticmethod
  def finish(running, timeout=300):
    """Each process's output, once all have exited 0 (within `timeout` seconds in all)."""
    deadline = time.time() + timeout
    for process in running:
      process.wait(timeout=max(deadline - time.time(), 1))
    outputs = []
    for process in running:
      process.log.seek(0)
      outputs.append(process.log.read())
    assert [p.returncode for p in running
           ] == [0] * len(running), '\n'.join(o[-3000:] for o in outputs)
    return outputs


@pytest.fixture(scope='session')
def pod():
  """pod.launch(command, logs, processes=2) -> running; pod.finish(running, timeout) ->
  outputs: train.py commands (from train_command) as one run of several processes."""
  return Processes
