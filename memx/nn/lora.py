"""LoRA and QLoRA: low-rank adapters on frozen (optionally NF4-quantized) projection weights.

LoRA (Hu et al., 2021) fine-tunes a trained model by learning, for each adapted weight W
[in..., out...], a low-rank update: y = x·W + (alpha / r)·(x·A)·B with A [in..., r] and
B [r, out...]. W stays frozen, so the gradient, the optimizer state and the checkpointed moments
exist for A and B only. B starts at zero (the adapted model starts as the base model) and A
uniform in ±1/sqrt(fan_in) (PEFT's Kaiming-uniform default).

QLoRA (Dettmers et al., 2023) also stores the frozen W in 4-bit NormalFloat with double-quantized
block scales (`NF4Weight`, memx.kernels.nf4): about 4.13 bits per weight instead of 16 or 32.
Its forward product runs on the packed codes (`memx.kernels.nf4.nf4_matmul`): the full-precision
W is never materialised, and gradients flow to x only (the base is frozen).

How the adapted model runs: `add_lora` replaces each targeted weight attribute of the model's
attention and SwiGLU modules (an nnx.Param) by a `LoRAWeight` holding the base, A and B. The
projections call `linear(x, weight, n_in)`, which takes the low-rank path through x·A (never
the merged [in, out] product A·B, whose gradient would be a full weight-sized tensor per layer).
Other readers of the weight (`weight[...]`: decoding's output projections) get the merged
weight W + (alpha/r)·A·B, equal in value. `merge_lora` folds the adapters back into plain
parameters (dequantizing NF4 bases) for export and serving.

Training only the adapters is the optimizer's choice: `nnx.Optimizer(..., wrt=nnx.LoRAParam)`
and the gradient's DiffState filter (memx.train.step). A and B are `nnx.LoRAParam`s, a subclass of
nnx.Param, so a full fine-tune of an adapted model (wrt=nnx.Param) trains them and the bases.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memx.nn.quantized import IntQWeight, NF4Weight

QUANTIZED = (NF4Weight, IntQWeight)

# The weights LoRA may adapt, with how many leading (input) dims each contracts with x:
# attention's q/k/v [d, heads, k] and output [heads, k, d], SwiGLU's [d, f] and [f, d].
TARGETS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


class LoRAWeight(nnx.Module):
  """A frozen base (nnx.Param, NF4Weight or IntQWeight) plus the update (alpha / rank)·A·B."""

  def __init__(self, base, n_in: int, rank: int, alpha: float, *, rngs: nnx.Rngs):
    shape = tuple(base.shape)
    if not 1 <= n_in < len(shape):
      raise ValueError(f"LoRAWeight: n_in = {n_in} input dims for a weight of shape {shape}; "
                       f"allowed: 1..{len(shape) - 1}")
    self.base = base
    self.n_in = n_in
    self.rank = rank
    self.scale = alpha / rank
    axes = base.get_metadata().get("axes") if isinstance(base, nnx.Variable) else base.axes
    axes = tuple(axes) if axes is not None else (None,) * len(shape)
    fan_in = math.prod(shape[:n_in])
    dtype = base.dtype
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(rngs.params(), (*shape[:n_in], rank), jnp.float32, -bound, bound)
    self.a = nnx.LoRAParam(a.astype(dtype), axes=(*axes[:n_in], None))
    self.b = nnx.LoRAParam(jnp.zeros((rank, *shape[n_in:]), dtype), axes=(None, *axes[n_in:]))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype

  def delta(self) -> jax.Array:
    """(alpha / rank)·A·B, shaped as the base."""
    return self.scale * jnp.tensordot(self.a[...], self.b[...], axes=1)

  def __getitem__(self, index):
    """The merged weight W + (alpha / rank)·A·B (decoding's readers of `weight[...]`)."""
    merged = self.base[...].astype(jnp.float32) + self.delta().astype(jnp.float32)
    return merged.astype(self.dtype)[index]


def linear(x: jax.Array, weight, n_in: int, dtype) -> jax.Array:
  """x [..., in...] · weight [in..., out...] → [..., out...] in `dtype`, contracting x's last
  n_in dims. weight is an nnx.Param, a quantized weight (memx.nn.quantized: the product runs on
  its codes) or a LoRAWeight (its base's product plus the low-rank path (x·A)·B)."""
  if isinstance(weight, LoRAWeight):
    if weight.n_in != n_in:
      raise ValueError(f"linear: the adapter was built for {weight.n_in} input dims, the call "
                       f"contracts {n_in}")
    y = linear(x, weight.base, n_in, dtype)
    xa = jnp.tensordot(x.astype(dtype), weight.a[...].astype(dtype), axes=n_in)
    return y + (weight.scale * jnp.tensordot(xa, weight.b[...].astype(dtype), axes=1)).astype(
        y.dtype)
  if isinstance(weight, QUANTIZED):
    return weight.matmul(x, n_in, dtype)
  return jnp.tensordot(x.astype(dtype), weight[...].astype(dtype), axes=n_in)


def _adaptable(model: nnx.Module, targets):
  """(module, attribute name) of every target weight in the model's blocks."""
  found = []
  for block in model.blocks:
    for owner in (getattr(block, "attn", None), getattr(block, "mlp", None)):
      if owner is None:
        continue
      for name in targets:
        if isinstance(getattr(owner, name, None), nnx.Param | NF4Weight | IntQWeight):
          found.append((owner, name))
  return found


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets=tuple(TARGETS),
             quantize_base: bool = False, rngs: nnx.Rngs) -> nnx.Module:
  """Wraps each target weight of the model's attention and SwiGLU layers in a LoRAWeight (in
  place; returns the model). quantize_base stores those bases as NF4Weight (QLoRA).

  Raises ValueError for an unknown target name, a rank < 1, or a model with no weight to adapt
  (e.g. a pure Mamba-2 or MatMul-free model: their projections are not LoRA targets)."""
  unknown = sorted(set(targets) - set(TARGETS))
  if unknown:
    raise ValueError(f"add_lora: unknown target weights {unknown}; allowed: {sorted(TARGETS)}")
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"add_lora: rank must be an integer >= 1, got {rank!r}")
  found = _adaptable(model, targets)
  if not found:
    raise ValueError(f"add_lora: the model has none of the target weights {sorted(targets)} "
                     "(LoRA adapts attention and SwiGLU projections; Mamba-2, linear-attention "
                     "and MatMul-free layers have none)")
  for owner, name in found:
    base = getattr(owner, name)
    n_in = TARGETS[name]
    if quantize_base and isinstance(base, nnx.Param):
      base = NF4Weight.from_weight(base, n_in)
    setattr(owner, name, LoRAWeight(base, n_in, rank, alpha, rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every LoRAWeight back into a plain nnx.Param W + (alpha / rank)·A·B (an NF4 base is
  dequantized first), in place; returns the model, which then runs as an unadapted one."""
  for block in model.blocks:
    for owner in (getattr(block, "attn", None), getattr(block, "mlp", None)):
      if owner is None:
        continue
      for name in TARGETS:
        w = getattr(owner, name, None)
        if isinstance(w, LoRAWeight):
          axes = (tuple(w.a.get_metadata()["axes"][:-1])
                  + tuple(w.b.get_metadata()["axes"][1:]))
          setattr(owner, name, nnx.Param(w[...], axes=axes))
  return model


def adapter_count(model: nnx.Module) -> int:
  """Trainable adapter parameters (A and B entries)."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
