"""Random-access document sources through TFDS (ArrayRecord files, no TensorFlow)."""

import os

import jax
import tensorflow_datasets as tfds
from etils import epath

from llama_jax import processes
from llama_jax.data import builtin_text
from llama_jax.errors import UserError


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
  """A random-access source whose items are documents (str)."""
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


def open_sources(data_config):
  """(builder, train source, eval source) of `data_config`; process 0 prepares the
  dataset once while the others wait."""
  if jax.process_index() == 0:
    prepare(dataset_builder(data_config.name, data_config.data_dir, data_config.text_dir))
  processes.sync('dataset prepared')
  builder = dataset_builder(data_config.name, data_config.data_dir, data_config.text_dir)
  if not builder.is_prepared():  # a catalog dataset that no one has built: say how to
    prepare(builder)
  return (builder, open_split(builder, data_config.train_split, data_config.text_feature),
          open_split(builder, data_config.eval_split, data_config.text_feature))
