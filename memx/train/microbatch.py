"""Gradient accumulation: one optimizer step from a global batch run in n microbatches.

`train.microbatches = n` cuts the global batch [B, ...] into n microbatches of B/n rows. They
run forward and backward one after another inside one `lax.scan`, and their gradients add up in
a float32 accumulator laid out like the parameters, so the activations alive at any moment are
those of B/n rows (the parameters' own size is added once, for the accumulator).

The loss stays the whole batch's weighted mean: microbatch j contributes
sum(loss_j · weight_j) / max(sum of the *whole batch's* weights, 1), a denominator that does not
depend on the parameters. The contributions and their gradients therefore sum to exactly the
full batch's loss and gradient; only the order of float additions differs. (Averaging the n
microbatch means instead would weight a microbatch with few weighted tokens, e.g. task rows
with one answer each, as much as a full one.)

Microbatch j holds rows j, j + n, j + 2n, ...: the loader splits the global batch into
contiguous shares across the data-parallel devices, and this split keeps every row on the
device that holds it, as long as B/n is a multiple of the data-parallel size (the loop checks
that before compiling). The task rows at the end of a batch spread over all microbatches.

Communication: each microbatch's gradient is reduced over the data-parallel devices inside the
loop as traced. XLA:GPU's while-loop-all-reduce-code-motion pass sinks such an all-reduce out
of the loop (the accumulator then sums unreduced gradients: one reduction per step); XLA:CPU
has no such pass, so on CPU meshes the reduction runs once per microbatch. Under FSDP the
parameters are gathered for every microbatch, and the gradients reduce-scattered for each
(sinking that too, XLA's --xla_gpu_enable_while_loop_reduce_scatter_code_motion, would keep
unsharded gradients). An optimization barrier at the top of the loop body keeps XLA from
hoisting the parameters' all-gathers out of the loop, which would hold them unsharded for the
whole step (more memory than without microbatches).

Only the `wrt` variables come out of a microbatch: changes a loss makes to other model state
(none of memx's models has such state) are not carried from one microbatch to the next.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memx.errors import ConfigError
from memx.parallel.axes import BATCH, SEQ
from memx.parallel.constrain import constrain

Batch = dict[str, jax.Array]


def check_split(train_cfg, data_size: int) -> None:
  """ConfigError unless each microbatch splits evenly over the data-parallel size (otherwise
  the split would move rows between devices, or fail to compile)."""
  micro = train_cfg.batch_size // train_cfg.microbatches
  if train_cfg.microbatches > 1 and micro % data_size:
    raise ConfigError(
        f"train.microbatches = {train_cfg.microbatches} is not allowed with train.batch_size = "
        f"{train_cfg.batch_size}: each microbatch of {micro} rows must split evenly over the "
        f"data-parallel size {data_size}, so batch_size / microbatches must be a multiple of "
        f"{data_size}. Use fewer microbatches or a larger batch.")


def split_microbatches(batch: Batch, n: int) -> Batch:
  """Every [B, ...] array as [n, B/n, ...], microbatch j = rows j, j + n, ... (see above)."""
  def one(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"a batch of {b} rows cannot be cut into {n} equal microbatches")
    y = jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)
    return constrain(y, (None, BATCH, SEQ, *(None,) * (y.ndim - 3))[:y.ndim])
  return {k: one(x) for k, x in batch.items()}


def value_and_grad(loss_fn: Callable[..., Any], model: nnx.Module, batch: Batch, n: int, *,
                   wrt: Any = nnx.Param, has_aux: bool = False):
  """(Σ_j loss_fn(model, microbatch_j), its gradient w.r.t. the model's `wrt` variables), or
  with has_aux ((Σ_j loss_j, Σ_j aux_j), gradient) for a loss_fn returning (loss, aux dict).

  loss_fn (and aux) must be additive over rows (sums over tokens with fixed denominators) for
  the result to be the full batch's. n = 1 is plain `nnx.value_and_grad`; for n > 1 the
  gradient is accumulated in float32 and returned in the variables' dtypes, as an nnx.State
  of the same structure."""
  if n == 1:
    return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(
        model, batch)
  with_aux = loss_fn if has_aux else (lambda model, mb: (loss_fn(model, mb), {}))
  grad_fn = nnx.value_and_grad(with_aux, argnums=nnx.DiffState(0, wrt), has_aux=True)
  (loss, aux), grads = accumulate_model(grad_fn, model, batch, n, wrt=wrt)
  return ((loss, aux) if has_aux else loss), grads


def accumulate_model(grad_fn: Callable[..., Any], model: nnx.Module, batch: Batch, n: int, *,
                     wrt: Any = nnx.Param):
  """Σ_j grad_fn(model, microbatch_j) for a grad_fn returning ((loss, aux dict), gradient of
  the `wrt` variables as an nnx.State): the gradient accumulation of `value_and_grad` around
  any way of computing a microbatch's gradient (local learning's, memx.train.local). n = 1 is
  grad_fn(model, batch)."""
  if n == 1:
    return grad_fn(model, batch)
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def one(p, rest, mb):
    return grad_fn(nnx.merge(graphdef, p, rest), mb)

  mbs = split_microbatches(batch, n)
  aux_shape = jax.eval_shape(one, params, rest, jax.tree.map(lambda x: x[0], mbs))[0][1]

  def body(carry, mb):
    total, aux_sum, acc = carry
    # The barrier ties the parameters to this iteration: without it XLA hoists their FSDP
    # all-gathers out of the loop, and every device holds them unsharded for the whole step.
    p, rest_p, mb = jax.lax.optimization_barrier((params, rest, mb))
    (loss, aux), g = one(p, rest_p, mb)
    acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
    return (total + loss.astype(jnp.float32), jax.tree.map(jnp.add, aux_sum, aux), acc), None

  zeros = jax.tree.map(_zeros_like_param, params, is_leaf=_is_variable)
  aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  (loss, aux, grads), _ = jax.lax.scan(body, (jnp.float32(0.0), aux0, zeros), mbs)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (loss, aux), grads


def sum_over(fn: Callable[[Any, Batch], dict], state: Any, batch: Batch, n: int) -> dict:
  """Σ_j fn(state, microbatch_j) for a fn returning a dict of sums (evaluation: loss sums,
  counts); n = 1 is fn(state, batch). `state` (the arrays fn reads every microbatch) passes
  through the loop's barrier, as in value_and_grad."""
  if n == 1:
    return fn(state, batch)
  mbs = split_microbatches(batch, n)
  first = jax.eval_shape(fn, state, jax.tree.map(lambda x: x[0], mbs))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

  def body(acc, mb):
    st, mb = jax.lax.optimization_barrier((state, mb))
    return jax.tree.map(jnp.add, acc, fn(st, mb)), None

  return jax.lax.scan(body, zeros, mbs)[0]


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _zeros_like_param(var):
  """A float32 zero accumulator for one parameter, sharded as the parameter (its logical axes),
  so under FSDP each device accumulates only its shard."""
  zeros = jnp.zeros(var.shape, jnp.float32)
  axes = var.get_metadata().get("axes")
  if axes is not None and len(axes) == zeros.ndim:
    zeros = constrain(zeros, axes)
  return var.replace(zeros)
