"""A TFDS dataset of the project's own: a folder of text files as train/validation splits.

Its default folder is the running interpreter's Python standard library (about 12 MB of
real text on every machine that has Python), so training needs no download. Each file is
a document (each line of a `.jsonl` file is one, from its "text" field); a stable hash of
the file's relative path puts about 2% of the files in `validation`, so splits never move.
Prepared once into ArrayRecord files under the TFDS data dir, then read by random access.
"""

import dataclasses
import hashlib
import json
import os
import re
import sysconfig

import tensorflow_datasets as tfds

EXTENSIONS = ('.py', '.txt', '.md', '.rst', '.jsonl')
SKIPPED_FOLDERS = {
    'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__', '.git'
}
VALIDATION_PERCENT = 2


def stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def text_files(text_dir: str) -> list[str]:
  """Paths of the documents under `text_dir`, relative to it, sorted; test folders skipped."""
  found = []
  for root, folders, files in os.walk(text_dir):
    folders[:] = sorted(f for f in folders if f not in SKIPPED_FOLDERS)
    found += [
        os.path.relpath(os.path.join(root, f), text_dir) for f in files if f.endswith(EXTENSIONS)
    ]
  return sorted(found)


def split_of(relative_path: str) -> str:
  digest = hashlib.sha256(relative_path.encode()).digest()
  return 'validation' if digest[0] * 100 // 256 < VALIDATION_PERCENT else 'train'


@dataclasses.dataclass(kw_only=True)
class TextFolderConfig(tfds.core.BuilderConfig):
  text_dir: str = ''


def folder_config(text_dir: str = '') -> TextFolderConfig:
  """The builder config for a folder; its name (the cache key) is derived from the path."""
  if not text_dir:
    name = 'python{}{}_stdlib'.format(*sysconfig.get_python_version().split('.'))
    return TextFolderConfig(name=name, text_dir=stdlib_dir(),
                            description='The Python standard library source.')
  text_dir = os.path.abspath(os.path.expanduser(text_dir))
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(text_dir).lower()).strip('_') or 'folder'
  digest = hashlib.sha256(text_dir.encode()).hexdigest()[:8]
  return TextFolderConfig(name=f'{slug}_{digest}', text_dir=text_dir,
                          description=f'Text files under {text_dir}.')


class BuiltinText(tfds.core.GeneratorBasedBuilder):
  """Documents from a folder of .py/.txt/.md/.rst/.jsonl files."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [folder_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    files = text_files(self.builder_config.text_dir)
    return {
        split: self._generate_examples([f for f in files if split_of(f) == split])
        for split in ('train', 'validation')
    }

  def _generate_examples(self, relative_paths):
    for relative_path in relative_paths:
      path = os.path.join(self.builder_config.text_dir, relative_path)
      with open(path, encoding='utf-8', errors='replace') as f:
        if not path.endswith('.jsonl'):
          yield relative_path, {'text': f.read()}
          continue
        for line_number, line in enumerate(f):
          if line.strip():
            yield f'{relative_path}:{line_number}', {'text': json.loads(line)['text']}
