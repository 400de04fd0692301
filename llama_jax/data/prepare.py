"""Prepares a corpus for random-access reading: text shards -> ArrayRecord files.

  python -m llama_jax.data.prepare --input=DIR_OR_BUCKET --output=DIR [--text_field=text]
      [--format=text|messages|prompt_completion] [--workers=2]
      [--process_index=I --process_count=N]

Reads `.txt` (a file is a document), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and `.parquet`
(one document per line or row, its `--text_field`) from a local folder or a gs:// bucket,
without TensorFlow. Every input file becomes one ArrayRecord file per split,
OUTPUT/train/NAME.array_record and OUTPUT/validation/NAME.array_record (a record is one
document's UTF-8 text); one document in VALIDATION_EVERY, chosen by a stable hash of its
text, goes to validation. A training config reads OUTPUT as the source `prepared:OUTPUT`.
With --format=messages or prompt_completion a document is a conversation: the record's
`messages` (or `prompt` and `completion`) fields, stored as a JSON string (data.format of
the source says so to the pipeline).

Scale: processes on one host (--workers) and hosts (the same command with --process_index
and --process_count on each) take disjoint shares of the input files. Crash safety: a
file's outputs are written under temporary names and renamed, then OUTPUT/done/NAME.json
records its counts; a rerun skips the files that have one and redoes the others. The input
is only read.
"""

import concurrent.futures
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time

from absl import app, flags
from etils import epath

from llama_jax.errors import UserError

EXTENSIONS = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')
# The fields a conversation record keeps, by --format.
CONVERSATION_FIELDS = {'messages': ('messages',), 'prompt_completion': ('prompt', 'completion')}
SPLITS = ('train', 'validation')
VALIDATION_EVERY = 50  # about 2% of the documents are held out


def _walk(folder: epath.Path):
  """Every file under `folder` (local or bucket), depth first."""
  for child in folder.iterdir():
    if child.is_dir():
      yield from _walk(child)
    else:
      yield child


def input_files(root: str) -> list[epath.Path]:
  """The corpus files under `root`, sorted by path (the order every process agrees on)."""
  path = epath.Path(root)
  if not path.is_dir():
    raise UserError(f'the input {root} is not a folder or bucket; give the folder that holds '
                    f'the corpus files ({", ".join(EXTENSIONS)}).')
  files = sorted(p for p in _walk(path) if p.name.endswith(EXTENSIONS))
  if not files:
    raise UserError(f'{root} holds no {", ".join(EXTENSIONS)} files.')
  return files


def _fields(form: str, text_field: str) -> tuple[str, ...]:
  if form == 'text':
    return (text_field,)
  if form not in CONVERSATION_FIELDS:
    raise UserError(f'--format is {form!r}; use text, {", ".join(CONVERSATION_FIELDS)}.')
  return CONVERSATION_FIELDS[form]


def _document(record: dict, form: str, fields: tuple[str, ...]) -> str:
  """The text field's text, or the conversation's fields as a JSON string."""
  if form == 'text':
    return record[fields[0]]
  return json.dumps({field: record[field] for field in fields}, ensure_ascii=False)


def _json_lines(lines, text_field: str, where: str, form: str = 'text'):
  fields = _fields(form, text_field)
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      raise UserError(f'{where}:{number} is not a JSON object; fix or remove the line.') from None
    if form == 'text' and not (isinstance(record, dict) and
                               isinstance(record.get(text_field), str)):
      raise UserError(f'{where}:{number} has no text field {text_field!r}; give the field '
                      'that holds the text with --text_field.')
    if form != 'text' and not (isinstance(record, dict) and all(f in record for f in fields)):
      raise UserError(f'{where}:{number} lacks the {" and ".join(fields)} field(s) that a '
                      f'--format={form} conversation has; fix the line or give the right --format.')
    yield _document(record, form, fields)


def documents(path: epath.Path, text_field: str = 'text', form: str = 'text'):
  """The documents (str) of one corpus file; a damaged file is one clear error."""
  name, where = path.name, os.fspath(path)
  fields = _fields(form, text_field)
  try:
    if name.endswith('.txt'):
      if form != 'text':
        raise UserError(f'{where} is a .txt file, which holds no --format={form} conversations; '
                        'give them as .jsonl or .parquet records.')
      yield path.read_bytes().decode('utf-8', errors='replace')
    elif name.endswith('.parquet'):
      import pyarrow.parquet as pq
      with path.open('rb') as f:
        table = pq.ParquetFile(f)
        missing = [field for field in fields if field not in table.schema_arrow.names]
        if missing:
          raise UserError(f'{where} has no column {missing[0]!r}; give the column that holds '
                          'the text with --text_field, or the right --format.')
        for batch in table.iter_batches(columns=list(fields)):
          for record in batch.to_pylist():
            if all(record[field] is not None for field in fields):
              yield _document(record, form, fields)
    else:
      with path.open('rb') as raw:
        if name.endswith('.gz'):
          stream = gzip.open(raw)
        elif name.endswith('.zst'):
          import zstandard
          stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
          stream = raw
        text = io.TextIOWrapper(stream, encoding='utf-8', errors='replace')
        yield from _json_lines(text, text_field, where, form)
  except UserError:
    raise
  except Exception as error:  # gzip, zstandard and pyarrow each raise their own kinds
    raise UserError(f'{where} cannot be read ({type(error).__name__}: {str(error)[:200]}); '
                    'it may be truncated or not what its name says.') from None


def _split_of(text: str) -> str:
  digest = hashlib.sha256(text.encode('utf-8', errors='replace')).digest()
  return 'validation' if int.from_bytes(digest[:8], 'little') % VALIDATION_EVERY == 0 else 'train'


def output_name(root: epath.Path, path: epath.Path) -> str:
  """The outputs' name for an input file: its path under the input root, '/' -> '__'."""
  return os.fspath(path.relative_to(root)).replace('/', '__')


def prepare_file(root: str, path: str, output: str, text_field: str, form: str = 'text') -> dict:
  """Writes one input file's two ArrayRecord files and its done marker; returns its counts."""
  from array_record.python import array_record_module
  root, path, output = epath.Path(root), epath.Path(path), epath.Path(output)
  name = output_name(root, path)
  counts = {'documents': 0, 'bytes': 0, 'train': 0, 'validation': 0}
  partial = {split: output / split / f'{name}.array_record.partial' for split in SPLITS}
  writers = {
      split: array_record_module.ArrayRecordWriter(os.fspath(partial[split]), 'group_size:1')
      for split in SPLITS
  }
  try:
    for text in documents(path, text_field, form):
      data = text.encode('utf-8', errors='replace')
      split = _split_of(text)
      writers[split].write(data)
      counts['documents'] += 1
      counts['bytes'] += len(data)
      counts[split] += 1
  except BaseException:
    for split in SPLITS:
      writers[split].close()
      partial[split].unlink(missing_ok=True)
    raise
  for writer in writers.values():
    writer.close()
  for split in SPLITS:  # replacing what a run killed between these renames left
    partial[split].replace(output / split / f'{name}.array_record')
  done = output / 'done' / f'{name}.json'
  (output / 'done' / f'{name}.json.partial').write_text(json.dumps(counts))
  (output / 'done' / f'{name}.json.partial').replace(done)
  return counts


def prepare(input_root: str, output: str, text_field: str = 'text', workers: int = 1,
            process_index: int = 0, process_count: int = 1, form: str = 'text') -> dict:
  """Prepares this process's share of the corpus; returns the counts it wrote and skipped."""
  if not 0 <= process_index < process_count:
    raise UserError(f'--process_index ({process_index}) must be in 0..--process_count - 1 '
                    f'({process_count - 1}).')
  _fields(form, text_field)  # an unknown --format stops here
  files = input_files(input_root)[process_index::process_count]
  output_path = epath.Path(output)
  for folder in (*SPLITS, 'done'):
    (output_path / folder).mkdir(parents=True, exist_ok=True)
  root = epath.Path(input_root)
  todo = [f for f in files if not (output_path / 'done' / f'{output_name(root, f)}.json').exists()]
  totals = {'files': len(todo), 'skipped': len(files) - len(todo), 'documents': 0, 'bytes': 0}
  start = time.perf_counter()

  def add(counts):
    totals['documents'] += counts['documents']
    totals['bytes'] += counts['bytes']

  if workers <= 1:
    for f in todo:
      add(prepare_file(input_root, os.fspath(f), output, text_field, form))
  else:  # spawned, not forked: the caller may have JAX or Arrow threads running
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = [
          pool.submit(prepare_file, input_root, os.fspath(f), output, text_field, form)
          for f in todo
      ]
      try:
        for future in concurrent.futures.as_completed(futures):
          add(future.result())
      except BaseException:  # one bad file: the files not started yet stay undone
        pool.shutdown(cancel_futures=True)
        raise
  totals['seconds'] = time.perf_counter() - start
  return totals


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    totals = prepare(FLAGS.input, FLAGS.output, FLAGS.text_field, FLAGS.workers,
                     FLAGS.process_index, FLAGS.process_count, FLAGS.format)
  except UserError as error:
    sys.exit(f'error: {error}')
  seconds = max(totals['seconds'], 1e-9)
  print(f'prepared {totals["files"]} file(s) ({totals["skipped"]} already done): '
        f'{totals["documents"]:,} documents, {totals["bytes"] / 1e6:,.1f} MB in {seconds:.1f}s = '
        f'{totals["documents"] / seconds:,.0f} documents/s, '
        f'{totals["bytes"] / 1e6 / seconds:,.1f} MB/s with {FLAGS.workers} worker(s)')


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'A folder or gs:// bucket of corpus files.')
  flags.DEFINE_string('output', None, 'Where the ArrayRecord files go (a folder).')
  flags.DEFINE_string('text_field', 'text', 'The JSON field or Parquet column with the text.')
  flags.DEFINE_string('format', 'text', 'text, or a conversation: messages | prompt_completion.')
  flags.DEFINE_integer('workers', 1, 'Processes on this host.')
  flags.DEFINE_integer('process_index', 0, 'This host among --process_count hosts.')
  flags.DEFINE_integer('process_count', 1, 'Hosts sharing the work (each a disjoint share).')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
