"""The pod path, compiled for TPU topologies (libtpu, no TPU): nothing global on one chip.

A CPU run cannot see an activation that lost its batch or length sharding: the numbers
stay right, only every chip computes and holds the whole global batch. These tests compile
the real train step for TPU slices and read what one chip holds.
"""

import importlib

import pytest
from jax.sharding import PartitionSpec

from llama_jax import aot, hlo
from llama_jax.errors import ConfigError
from llama_jax.sharding import logical_to_mesh

MIB = 2**20
# Mesh axes besides fsdp (which takes the remaining chips).
MESHES = {'fsdp': {}, 'fsdp_sequence_tensor': dict(sequence=2, tensor=2)}


def llama_shaped(chips, rows_per_fsdp_shard, *, dim=256, seq_len=1024, n_layers=2, vocab_size=32000,
                 **mesh):
  """A small LLaMA (by default the real 32000-token vocabulary) with a batch that grows with
  `chips`."""
  config = importlib.import_module('configs.default').get_config()
  config.model.update(dim=dim, n_layers=n_layers, n_heads=max(4, dim // 128), vocab_size=vocab_size,
                      max_seq_len=seq_len)
  fsdp = chips // (mesh.get('sequence', 1) * mesh.get('tensor', 1))
  config.train.update(batch_size=rows_per_fsdp_shard * fsdp, seq_len=seq_len)
  config.mesh.update(mesh)
  return config


def test_a_flattened_axis_keeps_the_sharding_of_every_axis_it_was_made_of():
  rules = importlib.import_module('configs.default').get_config().mesh.rules
  assert logical_to_mesh((('batch', 'length'), 'act_vocab'), rules) == PartitionSpec(
      ('data', 'fsdp', 'sequence'), 'tensor')
  assert logical_to_mesh(('batch', ('length', 'embed')), rules) == PartitionSpec(
      ('data', 'fsdp'), 'sequence')  # fsdp is taken: a mesh axis splits one array axis only
  with pytest.raises(ConfigError, match="'lenght' has no rule in config.mesh.rules"):
    logical_to_mesh(('batch', 'lenght'), rules)


def compile_for(topology, **kwargs):
  _, devices = aot.topology_devices(topology)
  compiled, _ = aot.compile_train_step(llama_shaped(len(devices), **kwargs), devices)
  return compiled


@pytest.mark.slow
def test_weak_scaling_keeps_the_memory_per_chip():
  """4x the chips and 4x the global batch (v5p-16 -> v5p-64: fsdp 2 -> 8 x sequence 2 x
  tensor 2): each chip's temporaries grow by less than 15%.

  Parameters and optimizer state shrink per chip (FSDP) and activations keep their size,
  so the temporaries barely move; an activation replicated over the batch axes (the whole
  global batch on every chip) grows 4x. Neither may the largest array on a chip grow, nor
  the bytes a chip all-gathers per step (one layer's weights at a time, keys and values
  across `sequence`): gathering an activation of the global batch grows with it. The mesh
  with every axis is the one where an activation can lose a split. On the fsdp-only
  default mesh only the 7B test below guards the total (one activation replicated over its
  2048-row batch would add 32 GiB to the 40 GiB it fits in, past its bound). Length 512,
  embed 128 and vocabulary 16000 (half of 1024, 256 and 32000, 4 heads at either size) keep
  each array's share of a chip's memory and take half the compile time.
  """
  sizes = dict(MESHES['fsdp_sequence_tensor'], dim=128, seq_len=512, vocab_size=16000)
  small = compile_for('v5p-16', rows_per_fsdp_shard=4, **sizes)
  big = compile_for('v5p-64', rows_per_fsdp_shard=4, **sizes)
  small_temp = aot.memory_per_chip(small)['temporaries']
  big_temp = aot.memory_per_chip(big)['temporaries']
  # Growth is the failure (a replicated activation); with context parallelism the
  # temporaries shrink on the larger slice (24.5 -> 19.5 MiB; 55.0 -> 46.4 at twice the size).
  assert big_temp < 1.15 * small_temp, (small_temp / MIB, big_temp / MIB)
  small_text, big_text = small.as_text(), big.as_text()
  small_largest = hlo.largest_arrays(small_text, 1)[0]
  big_largest = hlo.largest_arrays(big_text, 1)[0]
  assert big_largest[0] <= small_largest[0], (small_largest, big_largest)
  small_gathered = hlo.collectives(small_text)['all-gather'][1]
  big_gathered = hlo.collectives(big_text)['all-gather'][1]
  assert big_gathered < 1.1 * small_gathered, (small_gathered / MIB, big_gathered / MIB)


@pytest.mark.slow
def test_no_array_on_a_chip_holds_a_global_activation():
  """On 64 chips (fsdp 16 x sequence 2 x tensor 2) no array in one chip's program reaches
  half of the global [batch, length, embed] activation (bfloat16: 128 MiB here).

  What a chip should hold is 1/64 of each activation (a few times that for the MLP and the
  logits of one loss chunk) and one layer's gathered weights (the float32 [embed, vocab]
  output matrix, were it gathered whole, would be half the bound). The mesh with every axis
  is the one where an activation can lose a split. Length 1024, embed 512 and vocabulary
  16000 are half of 2048, 1024 and 32000: every array keeps its ratio to the bound (the
  largest, a loss chunk's logits, is 0.24 of it at either size) and the compile takes half
  the time.
  """
  batch, seq_len, dim = 128, 1024, 512
  compiled = compile_for('v5p-128', rows_per_fsdp_shard=8, dim=dim, seq_len=seq_len, n_layers=1,
                         vocab_size=16000, **MESHES['fsdp_sequence_tensor'])
  global_activation = batch * seq_len * dim * 2
  largest = hlo.largest_arrays(compiled.as_text(), 3)
  assert largest[0][0] < global_activation / 2, largest


@pytest.mark.slow
def test_llama_7b_at_the_paper_batch_fits_v5p_128():
  """docs/tpu.md's fit: 7B, 2048 x 2048 tokens in one microbatch, remat full, fsdp 64."""
  config = importlib.import_module('configs.llama_7b').get_config()
  chip, devices = aot.topology_devices('v5p-128')
  compiled, built = aot.compile_train_step(config, devices)
  assert config.train.microbatches == 1 and built.model_config.remat == 'full'
  total = aot.memory_per_chip(compiled)['total']
  assert total < 0.5 * chip.hbm_bytes, total / 2**30  # docs/tpu.md: 40.23 of 95 GiB
