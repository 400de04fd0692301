"""Conversations about the Python standard library, built offline (the `stdlib_qa` source).

"What does `json.dumps` do?" answered by the first paragraph of `json.dumps`' docstring,
for the public functions of MODULES; one conversation in VALIDATION_EVERY, chosen by a
stable hash of its question, is held out. The documents are JSON records of format
`messages` (data.format). Built from this interpreter's library in a second, no download.
"""

import functools
import hashlib
import importlib
import inspect
import json

from llama_jax.errors import UserError

MODULES = ('base64', 'bisect', 'calendar', 'collections', 'copy', 'csv', 'datetime', 'difflib',
           'fnmatch', 'functools', 'glob', 'gzip', 'hashlib', 'heapq', 'html', 'inspect',
           'itertools', 'json', 'math', 'operator', 'os', 'os.path', 'pathlib', 'pickle', 'random',
           're', 'shlex', 'shutil', 'statistics', 'string', 'struct', 'subprocess', 'tempfile',
           'textwrap', 'time', 'urllib.parse', 'uuid', 'zipfile', 'zlib')
VALIDATION_EVERY = 20  # about 5% of the conversations are held out


def _first_paragraph(doc: str) -> str:
  return ' '.join(doc.strip().split('\n\n')[0].split())


@functools.cache
def conversations() -> tuple[str, ...]:
  """Every question and answer, as JSON `{"messages": [user, assistant]}` records."""
  found = []
  for name in MODULES:
    module = importlib.import_module(name)
    for attribute, value in sorted(vars(module).items()):
      if attribute.startswith('_') or not callable(value) or inspect.isclass(value):
        continue
      doc = inspect.getdoc(value)
      if not doc or getattr(value, '__module__', None) not in (None, module.__name__):
        continue  # undocumented, or another module's function imported here
      answer = _first_paragraph(doc)
      if len(answer) >= 20:
        found.append(
            json.dumps({
                'messages': [{
                    'role': 'user',
                    'content': f'What does `{name}.{attribute}` do?'
                }, {
                    'role': 'assistant',
                    'content': answer
                }]
            }))
  return tuple(found)


def split(name: str) -> list[str]:
  """The conversations of split `name` (train | validation)."""
  if name not in ('train', 'validation'):
    raise UserError(f'stdlib_qa has the splits train and validation, not {name!r}.')

  def held_out(record: str) -> bool:
    question = json.loads(record)['messages'][0]['content']
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], 'little') % VALIDATION_EVERY == 0

  return [record for record in conversations() if held_out(record) == (name == 'validation')]
