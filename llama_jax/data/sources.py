"""Random-access documents: TFDS datasets and prepared corpora (ArrayRecord, no TensorFlow).

A dataset is named by a string: `builtin_text` (a local text folder, llama_jax.data.
builtin_text), `stdlib_qa` (conversations about the Python standard library, format
messages: llama_jax.data.stdlib_qa), a TFDS catalog name prepared in ArrayRecord format
(`c4/en:3.1.0`), or `prepared:FOLDER`, the output of `python -m llama_jax.data.prepare`.
"""

import os

import grain
import tensorflow_datasets as tfds
from etils import epath

from llama_jax.data import builtin_text, stdlib_qa
from llama_jax.errors import UserError

PREPARED = 'prepared:'
STDLIB_QA = 'stdlib_qa'


def dataset_builder(name: str, data_dir: str, text_dir: str = ''):
  """The TFDS builder for `name`: builtin_text (a local folder) or a catalog dataset."""
  data_dir = os.path.expanduser(data_dir)
  if name == 'builtin_text':
    if text_dir and not os.path.isdir(os.path.expanduser(text_dir)):
      raise UserError(f'data.text_dir {text_dir!r} is not a folder; point it at a folder '
                      'of .txt/.jsonl/.py files, or leave it empty for the Python stdlib.')
    config = builtin_text.folder_config(text_dir)
    return builtin_text.BuiltinText(config=config if text_dir else config.name, data_dir=data_dir,
                                    file_format='array_record')
  if not epath.Path(data_dir).exists():
    raise UserError(f'data.data_dir {data_dir!r} does not exist; set it to the folder (or '
                    f'bucket) where `tfds build {name.split(":")[0]} --data_dir=DIR '
                    '--file_format=array_record` prepared the dataset.')
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'TFDS knows no dataset named {name!r} (data.name); use a catalog name '
                    'such as c4/en:3.1.0, or builtin_text for a local text folder.') from None


def prepare(builder) -> None:
  """Writes the builtin dataset's ArrayRecord files once; catalog datasets must be built."""
  if builder.is_prepared():
    return
  if isinstance(builder, builtin_text.BuiltinText):
    if not builtin_text.text_files(builder.builder_config.text_dir):
      raise UserError(f'data.text_dir {builder.builder_config.text_dir!r} holds no '
                      f'{"/".join(builtin_text.EXTENSIONS)} files.')
    builder.download_and_prepare()
    return
  raise UserError(f'dataset {builder.name}:{builder.version} is not prepared in '
                  f'{builder.data_dir_root}; run `tfds build {builder.name} '
                  f'--data_dir={builder.data_dir_root} --file_format=array_record`.')


def open_split(builder, split: str, text_feature: str):
  """A random-access source whose items are TFDS examples holding `text_feature`."""
  if split not in builder.info.splits:
    raise UserError(f'dataset {builder.name} has no split {split!r}; it has '
                    f'{", ".join(sorted(builder.info.splits))}.')
  if text_feature not in builder.info.features:
    raise UserError(f'dataset {builder.name} has no feature {text_feature!r} '
                    f'(data.text_feature); it has {", ".join(builder.info.features)}.')
  formats = [builder.info.file_format] + list(builder.info.alternative_file_formats)
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
    raise UserError(f'dataset {builder.name} was prepared as {builder.info.file_format.value}; '
                    'random access needs ArrayRecord: rebuild it with `tfds build '
                    f'{builder.name} --file_format=array_record`.')
  return builder.as_data_source(split, file_format='array_record')


def prepared_folder(dataset: str, data_dir: str) -> epath.Path:
  """The folder of a `prepared:FOLDER` dataset (relative folders are under data.data_dir)."""
  folder = dataset.removeprefix(PREPARED)
  if '://' in folder or os.path.isabs(os.path.expanduser(folder)):
    return epath.Path(os.path.expanduser(folder))
  return epath.Path(os.path.expanduser(data_dir)) / folder


def _prepared_files(dataset: str, data_dir: str, split: str) -> list[str]:
  folder = prepared_folder(dataset, data_dir)
  files = sorted(os.fspath(p) for p in (folder / split).glob('*.array_record'))
  if not files:
    raise UserError(f'{folder} holds no prepared {split} files; run `python -m '
                    f'llama_jax.data.prepare --input=CORPUS --output={folder}` first.')
  return files


def builtin_or_catalog(dataset: str) -> bool:
  return not dataset.startswith(PREPARED)


def prepare_dataset(dataset: str, data_config) -> None:
  """Builds the builtin dataset once; for the others, a clear error if they are not ready."""
  if dataset == STDLIB_QA:
    return
  if builtin_or_catalog(dataset):
    prepare(dataset_builder(dataset, data_config.data_dir, data_config.text_dir))
  else:
    _prepared_files(dataset, data_config.data_dir, data_config.train_split)


def documents(dataset: str, data_config, split: str) -> grain.MapDataset:
  """The documents (str) of one split of `dataset`, by random access."""
  if dataset == STDLIB_QA:
    return grain.MapDataset.source(stdlib_qa.split(split))
  if builtin_or_catalog(dataset):
    builder = dataset_builder(dataset, data_config.data_dir, data_config.text_dir)
    prepare(builder)  # a no-op once built; a clear error for a catalog set no one built
    feature = data_config.text_feature
    return grain.MapDataset.source(open_split(builder, split,
                                              feature)).map(lambda example: _text(example[feature]))
  files = _prepared_files(dataset, data_config.data_dir, split)
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files)).map(_text)


def _text(value) -> str:
  return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else value


def cache_name(dataset: str, data_config) -> str:
  """A file-name-safe name of `dataset` (for a tokenizer trained on it)."""
  if dataset == STDLIB_QA:
    return dataset
  if not builtin_or_catalog(dataset):
    return 'prepared_' + prepared_folder(dataset, data_config.data_dir).name
  builder = dataset_builder(dataset, data_config.data_dir, data_config.text_dir)
  name = builder.name + (f'_{builder.builder_config.name}' if builder.builder_config else '')
  return name.replace('/', '_')
