"""What a compiled step holds and sends on one chip, read from its optimized HLO text.

After SPMD partitioning every array in the HLO is one device's piece, so the largest
arrays show whether some activation lives whole on each chip, and the collectives show
what crosses the interconnect per step (an op inside a loop counts once per iteration).
`instructions` names what each instruction is, for reading a CPU profile of the step.
"""

import math
import re
from typing import NamedTuple

import numpy as np

_BYTES = {
    'pred': 1,
    's8': 1,
    'u8': 1,
    's16': 2,
    'u16': 2,
    'f16': 2,
    'bf16': 2,
    's32': 4,
    'u32': 4,
    'f32': 4,
    's64': 8,
    'u64': 8,
    'f64': 8
}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) \(')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$')
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


def _array_bytes(text: str) -> list[tuple[int, str]]:
  return [(math.prod(int(d) for d in dims.split(',') if d) * _BYTES[dtype],
           f'{dtype}[{dims}]') for dtype, dims in _ARRAY.findall(text)]


def largest_arrays(hlo_text: str, n: int = 5) -> list[tuple[int, str]]:
  """The n largest distinct array shapes in the program: [(bytes, 'f32[512,32000]')]."""
  return sorted(set(_array_bytes(hlo_text)), reverse=True)[:n]


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines; the entry computation is named 'ENTRY'."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith('{'):
      current = 'ENTRY' if line.startswith('ENTRY') else header.group(1)
      computations[current] = []
    elif line.rstrip() == '}':  # (a kernel's multi-line config may start a line with '}')
      current = None
    elif current is not None:
      computations[current].append(line)
  return computations


def _trip_count(while_line: str, condition: list[str]) -> int | None:
  """Iterations of a while loop: XLA's known trip count, else the constant that the
  condition's root compares the counter with; None if the condition compares with none
  (a bound computed at run time)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known.group(1))
  constants, root = {}, None
  for line in condition:
    match = _INSTRUCTION.match(line)
    if match and match.group(3) == 'constant':
      value = re.match(r'(-?\d+)\)', match.group(4))
      if value:
        constants[match.group(1)] = int(value.group(1))
    if match and line.lstrip().startswith('ROOT'):
      root = match.group(4)
  operands = re.findall(r'%([\w.\-]+)', (root or '').split(')')[0])
  return max((constants[name] for name in operands if name in constants), default=None)


def _executions(computations: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per execution of the entry computation: the sum,
  over every place that calls it, of the caller's runs times the loop's trip count."""
  calls = {name: [] for name in computations}  # caller -> [(callee, times)]
  for name, lines in computations.items():
    for line in lines:
      loop = re.search(r'condition=%?([\w.\-]+), body=%?([\w.\-]+)', line)
      if loop:
        found = [(loop.group(2), _trip_count(line, computations.get(loop.group(1), [])) or 1)]
      else:
        found = [(callee, 1) for callee in re.findall(
            r'(?:calls|to_apply|branch_computations|true_computation|false_computation)='
            r'\{?%?([\w.\-]+)', line)]
      calls[name] += [(callee, times) for callee, times in found if callee in computations]
  callers = {name: 0 for name in computations}
  for edges in calls.values():
    for callee, _ in edges:
      callers[callee] += 1
  runs = dict.fromkeys(computations, 0)
  runs['ENTRY'] = 1
  ready = [name for name, count in callers.items() if count == 0]  # the call graph is a DAG
  while ready:
    name = ready.pop()
    for callee, times in calls[name]:
      runs[callee] += runs[name] * times
      callers[callee] -= 1
      if callers[callee] == 0:
        ready.append(callee)
  return runs


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{kind: (ops per step, result bytes per chip per step)} for each collective kind.

  Asynchronous pairs count once, at their `-done` op; a combined (tuple) collective counts
  the bytes of all its results.
  """
  computations = _computations(hlo_text)
  runs = _executions(computations)
  totals = {kind: [0, 0] for kind in COLLECTIVES}
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      kind = match.group(3).removesuffix('-done')
      if kind not in totals:  # (a '-start' op is counted at its '-done')
        continue
      times = runs.get(name, 0)
      totals[kind][0] += times
      totals[kind][1] += times * sum(size for size, _ in _array_bytes(match.group(2)))
  return {kind: tuple(total) for kind, total in totals.items()}


def _dims(type_text: str) -> list[int]:
  match = _ARRAY.search(type_text)
  return [int(d) for d in match.group(2).split(',') if d] if match else []


def _spatial_taps(size, window, stride, pad_low, pad_high, lhs_dilate, rhs_dilate) -> int:
  """Window taps that land on an input element (not padding, not a hole of `lhs_dilate`),
  summed over the output positions of one spatial dimension."""
  dilated = (size - 1) * lhs_dilate + 1
  outputs = (dilated + pad_low + pad_high - (window - 1) * rhs_dilate - 1) // stride + 1
  at = (np.arange(outputs)[:, None] * stride + np.arange(window)[None, :] * rhs_dilate - pad_low)
  return int(((at >= 0) & (at < dilated) & (at % lhs_dilate == 0)).sum())


def _convolution_flops(result: str, convolution: str, shapes: dict[str, str]) -> int:
  """2 x the multiply-adds of a convolution: per output position, the kernel's input
  features x the window taps that land on input elements. (The TPU compiler writes every
  matmul as a convolution; a batched one's batch dimensions become spatial ones whose
  padding or `lhs_dilate` holes leave one tap per output position.)"""
  lhs_name, kernel_name = re.findall(r'%([\w.\-]+)', convolution.split(')')[0])[:2]
  lhs_labels, kernel_labels, out_labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)',
                                                    convolution).groups()
  lhs_dims, kernel_dims = _dims(shapes[lhs_name]), _dims(shapes[kernel_name])
  out_dims = _dims(result)
  window = re.search(r'window=\{([^}]*)\}', convolution)
  fields = dict(item.split('=') for item in window.group(1).split()) if window else {}
  spatial = sorted(label for label in out_labels if label.isdigit())

  def field(key, default):  # one value per spatial dimension
    return fields.get(key, 'x'.join([default] * len(spatial))).split('x')

  taps = 1
  for label, stride, pad, lhs_dilate, rhs_dilate in zip(spatial, field('stride', '1'),
                                                        field('pad', '0_0'),
                                                        field('lhs_dilate', '1'),
                                                        field('rhs_dilate', '1')):
    taps *= _spatial_taps(lhs_dims[lhs_labels.index(label)],
                          kernel_dims[kernel_labels.index(label)], int(stride),
                          *map(int, pad.split('_')), int(lhs_dilate), int(rhs_dilate))
  positions = math.prod(out_dims[out_labels.index(label)] for label in spatial)
  others = math.prod(out_dims) // max(positions, 1)  # batch x output features
  return 2 * others * kernel_dims[kernel_labels.index('i')] * taps


def dot_flops(hlo_text: str) -> int:
  """Matmul FLOPs per chip per execution: 2 x output elements x contracted size of every
  dot (or convolution), loops counted by their trip count, a conditional by its costliest
  branch.

  Raises ValueError for a loop with dots whose trip count is not in the HLO (a bound
  computed at run time): its FLOPs cannot be known from the program."""
  computations = _computations(hlo_text)
  shapes = {}  # instruction name -> its result type
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        shapes[match.group(1)] = match.group(2)

  cost = {}

  def flops(name):
    if name in cost:
      return cost[name]
    total = 0
    for line in computations.get(name, []):
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      op, rest = match.group(3), match.group(4)
      if op == 'dot':
        lhs = re.match(r'%?([\w.\-]+)', rest).group(1)
        contracting = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', rest).group(1)
        lhs_dims = _dims(shapes[lhs])
        size = math.prod(lhs_dims[int(d)] for d in contracting.split(',') if d)
        total += 2 * math.prod(_dims(match.group(2))) * size
      elif op == 'convolution':  # (TPUs write every matmul as one)
        total += _convolution_flops(match.group(2), rest, shapes)
      loop = re.search(r'condition=%?([\w.\-]+), body=%?([\w.\-]+)', rest)
      branches = re.search(r'branch_computations=\{([^}]*)\}', rest) or re.search(
          r'true_computation=(%?[\w.\-]+), false_computation=(%?[\w.\-]+)', rest)
      if loop:
        body_flops = flops(loop.group(2))
        trips = _trip_count(line, computations.get(loop.group(1), []))
        if trips is None and body_flops:
          raise ValueError(f'the while loop {match.group(1)} has matmuls and no trip count in the '
                           'HLO (its bound is computed at run time)')
        total += (trips or 0) * body_flops
      elif branches:
        names = ','.join(branches.groups()).split(',')
        total += max(flops(name.strip().lstrip('%')) for name in names)
      else:
        callees = re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', rest)
        total += sum(flops(callee) for callee in callees)
    cost[name] = total
    return total

  return flops('ENTRY')


def dot_types(hlo_text: str) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every dot, e.g. ('bf16', 'bf16', 'f32'); reads
  optimized HLO and the unoptimized text of `lowered.as_text(dialect='hlo')` alike."""
  types, dots = {}, []  # instruction name -> its result type; the dots' regex matches
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      types[match.group(1)] = match.group(2)
      if match.group(3) == 'dot':
        dots.append(match)
  element = lambda type_text: _ARRAY.search(type_text).group(1)
  operand = re.compile(r'(?:(\w+\[[0-9,]*\])\S* )?%?([\w.\-]+)')
  return [
      tuple(element(inline or types[name])
            for inline, name in operand.findall(match.group(4))[:2]) + (element(match.group(2)),)
      for match in dots
  ]


_LAYOUT = {'copy', 'transpose', 'bitcast', 'reshape', 'parameter', 'tuple', 'get-tuple-element'}
_BOOKKEEPING = {
    'dynamic-slice', 'dynamic-update-slice', 'slice', 'concatenate', 'pad', 'while', 'conditional',
    'call', 'tuple', 'get-tuple-element', 'parameter', 'constant', 'iota', 'gather', 'scatter',
    'bitcast', 'reshape', 'broadcast', 'copy'
}
_UPDATE_FILES = re.compile(r'/optax/|/llama_jax/(?:steps|optim)\.py$')


def _innermost_files(hlo_text: str) -> dict[str, str]:
  """stack_frame_id -> the file of its innermost frame, from the module's frame tables."""
  tables, current = {}, None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FileLocations', 'StackFrames'):
      current = tables.setdefault(line, {})
    elif not line.strip() or line.startswith('%') or line.startswith('ENTRY'):
      current = None
    elif current is not None:
      key, _, value = line.partition(' ')
      current[key] = value
  files = {k: v.strip('"') for k, v in tables.get('FileNames', {}).items()}
  location_file = {
      k: files.get(re.search(r'file_name_id=(\d+)', v).group(1), '')
      for k, v in tables.get('FileLocations', {}).items()
  }
  return {
      k: location_file.get(re.search(r'file_location_id=(\d+)', v).group(1), '')
      for k, v in tables.get('StackFrames', {}).items()
  }


class Instruction(NamedTuple):
  category: str  # 'matmul', 'layout copy', ...: see `instructions`
  opcode: str
  shape: str  # the result's type, e.g. 'f32[8,256,512]{2,1,0}'


def instructions(hlo_text: str) -> dict[str, Instruction]:
  """Each instruction of the module (the names a CPU profile's events carry) -> its
  Instruction. Categories: a product (dot, convolution, or a fusion holding one) is 'matmul';
  a fusion of copies/transposes only 'layout copy'; slicing, gathers, zero-filled buffers and
  loop plumbing 'scan bookkeeping'; what the optimizer's code (optax, llama_jax/optim.py,
  steps.py) emitted 'optimizer update'; other fusions 'reduce' when they hold a reduce, else
  'elementwise'."""
  computations = _computations(hlo_text)
  frame_files = _innermost_files(hlo_text)
  opcodes = {}  # computation -> opcodes of its instructions, called computations included
  for name, lines in computations.items():
    opcodes[name] = {m.group(3) for m in map(_INSTRUCTION.match, lines) if m}

  def called_opcodes(rest: str) -> set[str]:
    called = set()
    for callee in re.findall(r'calls=%([\w.\-]+)', rest):
      called |= opcodes.get(callee, set())
    return called

  categories = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      name, opcode, rest = match.group(1), match.group(3), match.group(4)
      inner = called_opcodes(rest) if opcode == 'fusion' else {opcode}
      frame = re.search(r'stack_frame_id=(\d+)', rest)
      source = frame_files.get(frame.group(1), '') if frame else ''
      if inner & {'dot', 'convolution'}:
        category = 'matmul'
      elif opcode != 'while' and _UPDATE_FILES.search(source):
        category = 'optimizer update'
      elif inner <= _LAYOUT and inner & {'copy', 'transpose'}:
        category = 'layout copy'
      elif inner <= _BOOKKEEPING:
        category = 'scan bookkeeping'
      elif opcode == 'fusion' or inner & {'reduce', 'reduce-window'}:
        category = 'reduce' if inner & {'reduce', 'reduce-window'} else 'elementwise'
      elif opcode in ('custom-call', 'rng-bit-generator', 'sort'):
        category = 'other'
      else:
        category = 'elementwise'
      categories[name] = Instruction(category, opcode, match.group(2))
  return categories
