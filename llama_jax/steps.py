"""The step functions: train state, the jitted train step and the jitted eval step.

The train step is a pure function of (state, batch): forward in the compute dtype,
next-token cross-entropy in float32 (weighted, so padding and document boundaries can
be ignored), optional z-loss, gradients accumulated over microbatches with a scan,
then the optax update. A step whose loss or gradient norm is not finite changes nothing
and is counted instead. With LoRA (model.lora.rank > 0) only the adapters are trained
parameters; the base is frozen in the compute dtype, with no gradient and no optimizer state.

The trained parameters are stored in train.param_dtype; when that is bfloat16 a float32
master copy (optim.master_memory) receives the update, or, without one, the update is
computed in float32 and rounded into the bfloat16 weights. State held in host memory
(optim.master_memory / optim.state_memory = host) is updated a slice at a time, each
slice moved to the device and back (host_update.py, docs/memory.md).
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama_jax import context_parallel
from llama_jax import cross_entropy
from llama_jax import host_update
from llama_jax import lora
from llama_jax import model as model_lib
from llama_jax import optim
from llama_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken
  params: nnx.State  # trained parameters (a LoRA run's adapters) in train.param_dtype
  opt_state: optax.OptState  # mirrors params
  bad_steps: jax.Array  # [] int32: consecutive skipped (non-finite) steps
  skipped_steps: jax.Array  # [] int32: all skipped steps
  frozen: nnx.State  # a LoRA run's base parameters in the compute dtype; empty otherwise
  master: nnx.State  # float32 copy of bfloat16 params (optim.master_memory); empty otherwise


def split_trainable(params: nnx.State, model_config) -> tuple[nnx.State, nnx.State]:
  """(trained, frozen): every parameter and nothing, or (LoRA) the adapters and the base,
  the base cast to the compute dtype."""
  if not model_config.lora.rank:
    return params, nnx.State({})
  adapters, base = nnx.split_state(params, lora.Adapter, ...)
  return adapters, jax.tree.map(lambda p: p.astype(model_config.compute_dtype), base)


def all_params(state: TrainState) -> nnx.State:
  """The model's every parameter: the trained ones and the frozen ones together."""
  return nnx.merge_state(state.params, state.frozen)


def with_params(state: TrainState, params: nnx.State) -> TrainState:
  """`state` with new float32 trained parameters: stored in its dtype, and as its master."""
  stored = jax.tree.map(lambda p, old: p.astype(old.dtype), params, state.params)
  return state.replace(params=stored,
                       master=optim.cast(params, jnp.float32) if state.master else state.master)


def init_state(seed, *, model_config, optimizer, param_dtype=jnp.float32,
               master: bool = False) -> TrainState:
  """The initial state; `master`: keep a float32 copy when param_dtype is not float32."""
  params = nnx.state(model_lib.Transformer(model_config, rngs=nnx.Rngs(jax.random.key(seed))),
                     nnx.Param)
  params, frozen = split_trainable(params, model_config)
  zero = jnp.zeros((), jnp.int32)
  stored = optim.cast(params, param_dtype)
  master_copy = params if master and param_dtype != jnp.float32 else nnx.State({})
  return TrainState(zero, stored, optimizer.init(params), zero, zero, frozen, master_copy)


def abstract_state(model_config, optimizer, **storage) -> TrainState:
  """The state's shapes and logical axes, with no memory used; storage: init_state's."""
  return jax.eval_shape(
      functools.partial(init_state, model_config=model_config, optimizer=optimizer, **storage), 0)


def create_sharded_state(seed, model_config, optimizer, shardings, **storage) -> TrainState:
  """Initializes the state directly into its shardings: never whole on one device."""
  init = functools.partial(init_state, model_config=model_config, optimizer=optimizer, **storage)
  return jax.jit(init, out_shardings=shardings)(seed)


def graphdef_of(model_config):
  return nnx.split(model_lib.abstract_model(model_config), nnx.Param)[0]


def token_losses(params, graphdef, batch, z_loss: float, segment_mask: bool, loss_chunks: int):
  """Sum of weighted per-token losses, sum of weights, sum of weighted NLL.

  The losses are computed `loss_chunks` slices of the sequence at a time (see
  cross_entropy.py); only the first sum carries a gradient.
  """
  model = nnx.merge(graphdef, params)
  if segment_mask:
    inputs = (batch['inputs'], batch['positions'], batch['segment_ids'])
  else:
    inputs = (batch['inputs'],
              jnp.broadcast_to(jnp.arange(batch['inputs'].shape[1]), batch['inputs'].shape), None)
  # Under a `sequence` axis the tokens and everything that follows them go in the
  # load-balanced layout of context parallelism; the loss sums over tokens, so it is unchanged.
  shards = context_parallel.sequence_shards()
  inputs, targets, weights = context_parallel.to_layout(
      (inputs, batch['targets'], batch['weights']), shards)
  x, _ = model.features(*inputs)
  loss, nll = cross_entropy.cross_entropy(x, model.output_weights(), targets, weights, z_loss,
                                          loss_chunks)
  return loss, jnp.sum(batch['weights']), nll


def train_step(state: TrainState, batch, *, graphdef, optimizer, microbatches: int, z_loss: float,
               segment_mask: bool, loss_chunks: int, learning_rate, clip_norm: float, on_host=(),
               param_shardings=None):
  """One optimizer step on `batch` (dict of [batch, length] arrays); returns state, metrics.

  on_host: the names of the state's fields held in host memory ('master', 'opt_state'),
  updated slice by slice by host_update.py, which clips the gradients by clip_norm (the
  optimizer's clipping) itself and slices along the axes param_shardings leaves whole.
  """

  # Every loss is divided by the batch's total weight up front: the gradients come out
  # averaged, with no pass over them to divide.
  total_weight = jnp.maximum(jnp.sum(batch['weights']), 1.0)

  def mean_loss(params, micro):  # differentiated by the trained parameters only
    loss, _, nll = token_losses(nnx.merge_state(params, state.frozen), graphdef, micro, z_loss,
                                segment_mask, loss_chunks)
    return loss / total_weight, nll / total_weight

  if microbatches == 1:
    (_, loss), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params, batch)
  else:

    def accumulate(carry, micro):
      grads, loss = carry
      (_, micro_loss), micro_grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params,
                                                                                 micro)
      # in the params' dtype (a bfloat16 output projection's gradient comes out float32)
      grads = jax.tree.map(lambda sum_, g: sum_ + g.astype(sum_.dtype), grads, micro_grads)
      return (grads, loss + micro_loss), None

    # Microbatch i takes rows i, i + k, i + 2k, ...: every microbatch spans all devices.
    split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(
        0, 1)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(())), jax.tree.map(split, batch))
  grad_norm = optax.tree.norm(optim.cast(grads, jnp.float32))  # grads: in param_dtype

  # A non-finite step keeps the old values, chosen per element: one elementwise pass over
  # each leaf that XLA writes into the donated buffers. (A lax.cond between two whole new
  # trees made XLA's GPU compiler keep three extra float32 copies of the parameters.)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if on_host:
    params, opt_state, master = host_update.update(optimizer, grads, grad_norm, clip_norm, state,
                                                   finite, on_host, param_shardings)
  else:
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    # The update goes to the float32 master, or to the float32 values of the stored params
    # (no copy when they are float32), then is rounded into the stored dtype.
    master = state.master if state.master else optim.cast(state.params, jnp.float32)
    updates, opt_state = optimizer.update(optim.cast(grads, jnp.float32), state.opt_state, master)
    master = optax.apply_updates(master, updates)
    params = jax.tree.map(lambda new, old: keep_if_bad(new.astype(old.dtype), old), master,
                          state.params)
    opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
    master = jax.tree.map(keep_if_bad, master, state.master) if state.master else state.master
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, master=master,
                            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
                            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      'lr': learning_rate(state.step),
      'skipped_steps': new_state.skipped_steps,
      'bad_steps': new_state.bad_steps
  }
  return new_state, metrics


def eval_step(params, batch, token_bytes, *, graphdef, segment_mask: bool, loss_chunks: int):
  """Sums over the batch of NLL, of weights and of the UTF-8 bytes the scored tokens stand
  for (token_bytes: [vocab]), to average over many batches."""
  _, weight, nll = token_losses(params, graphdef, batch, 0.0, segment_mask, loss_chunks)
  return nll, weight, jnp.sum(token_bytes[batch['targets']] * batch['weights'])


def jit_train_step(mesh, rules, state_shardings, *, graphdef, optimizer, learning_rate, clip_norm,
                   microbatches, z_loss, segment_mask, loss_chunks):
  """The train step, jitted with the state's shardings and its buffers donated."""
  on_host = tuple(field for field in ('master', 'opt_state') if any(
      s.memory_kind == 'pinned_host' for s in jax.tree.leaves(getattr(state_shardings, field))))

  def step(state, batch):
    with sharding_lib.activation_sharding(mesh, rules):
      return train_step(state, batch, graphdef=graphdef, optimizer=optimizer,
                        microbatches=microbatches, z_loss=z_loss, segment_mask=segment_mask,
                        loss_chunks=loss_chunks, learning_rate=learning_rate, clip_norm=clip_norm,
                        on_host=on_host, param_shardings=state_shardings.params)

  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(mesh, rules, params_shardings, *, graphdef, segment_mask, loss_chunks):
  """The eval step, jitted with the parameters' and the batch's shardings."""
  def step(params, batch, token_bytes):
    with sharding_lib.activation_sharding(mesh, rules):
      return eval_step(params, batch, token_bytes, graphdef=graphdef, segment_mask=segment_mask,
                       loss_chunks=loss_chunks)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
      step, in_shardings=(params_shardings, sharding_lib.batch_sharding(mesh, rules), replicated))
