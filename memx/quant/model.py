"""Quantize a trained model's projections in place: GPTQ layer by layer on calibration data,
round-to-nearest, or NF4.

What is quantized: the attention projections (wq, wk, wv, wo) and SwiGLU's (w_gate, w_up,
w_down) of every block, the weights memx.nn.lora.TARGETS names; the embedding, the output head,
norms and the other mixers (Mamba-2, linear attention, MLGRU) keep their precision, as GPTQ
keeps the head and embeddings. Each becomes a frozen IntQWeight (or NF4Weight) whose matmul runs
on the codes (memx.nn.quantized).

GPTQ runs sequentially, as in the paper: the calibration hidden states enter block 0; inside a
block, q/k/v are quantized against the Hessian of their shared input (the normed hidden state),
then wo against that of the attention heads computed *with* the quantized q/k/v, then gate and
up, then down against the SwiGLU activations of the quantized gate and up; the block's output
with its quantized weights is the next block's input. Each layer thus compensates the errors of
the layers before it.
"""

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels import intq
from memx.kernels.attention import attention
from memx.models.transformer import TransformerLM
from memx.nn.lora import TARGETS, LoRAWeight
from memx.nn.quantized import IntQWeight, NF4Weight
from memx.quant.config import WeightQuant
from memx.quant.gptq import gptq, rtn


def _matrix(weight, n_in: int) -> jax.Array:
  """The weight's [K, N] matrix view, float32."""
  a = weight[...]
  return a.reshape(math.prod(a.shape[:n_in]), -1).astype(jnp.float32)


def targets(model: TransformerLM) -> list[tuple[int, object, str]]:
  """(layer, owner module, weight name) of every weight to quantize, in layer order."""
  out = []
  for i, block in enumerate(model.blocks):
    for owner in (getattr(block, "attn", None), getattr(block, "mlp", None)):
      for name in TARGETS:
        if owner is not None and isinstance(getattr(owner, name, None), nnx.Param):
          out.append((i, owner, name))
  return out


def check(model: TransformerLM, wq: WeightQuant) -> None:
  """ValueError, before any compute, when the model has nothing to quantize, holds adapters, or
  a weight's input size K is not a whole number of groups."""
  if any(isinstance(v, LoRAWeight) for _, v in nnx.iter_graph(model)):
    raise ValueError("the model holds LoRA adapters: merge them first (memx.nn.lora.merge_lora)")
  found = targets(model)
  if not found:
    raise ValueError("the model has no attention or SwiGLU projection to quantize")
  for layer, owner, name in found:
    shape = getattr(owner, name).shape
    k = math.prod(shape[:TARGETS[name]])
    if k % wq.group_size:
      raise ValueError(f"layer {layer} {name} {tuple(shape)} has K = {k} inputs, not a whole "
                       f"number of groups of {wq.group_size}; use a group size that divides "
                       f"every projection's input size")


def _replace(owner, name: str, codes, scales, zeros, wq: WeightQuant) -> dict:
  weight = getattr(owner, name)
  w = weight[...]
  q = IntQWeight.from_codes(weight, TARGETS[name], codes, scales, zeros, bits=wq.bits,
                            group_size=wq.group_size)
  setattr(owner, name, q)
  return {"bytes": q.nbytes(), "weights": int(w.size)}


def quantize_model(model: TransformerLM, wq: WeightQuant, calib: list | None = None,
                   log=print) -> dict:
  """Quantizes model's projections in place (see the module docstring); returns statistics:
  per weight its relative output error on the calibration inputs (GPTQ: ‖X·(W − Ŵ)‖² / ‖X·W‖²),
  the quantized bytes and bits per weight, and the seconds taken.

  calib: GPTQ's calibration batches (each {"inputs": [B, T] token ids}); unused otherwise."""
  check(model, wq)
  t0 = time.perf_counter()
  if wq.method == "gptq":
    if not calib:
      raise ValueError("gptq needs calibration batches")
    errors, sizes = _gptq_model(model, wq, calib, log)
  else:
    errors, sizes = {}, []
    for _, owner, name in targets(model):
      weight = getattr(owner, name)
      if wq.method == "nf4":
        q = NF4Weight.from_weight(weight, TARGETS[name])
        sizes.append({"bytes": q.nbytes(), "weights": int(weight[...].size)})
        setattr(owner, name, q)
      else:
        codes, scales, zeros = rtn(_matrix(weight, TARGETS[name]), bits=wq.bits,
                                   group_size=wq.group_size)
        sizes.append(_replace(owner, name, codes, scales, zeros, wq))
  n_bytes, n_weights = sum(s["bytes"] for s in sizes), sum(s["weights"] for s in sizes)
  return {"method": wq.method, "bits": wq.bits, "group_size": wq.group_size,
          "quantized_weights": n_weights, "quantized_bytes": n_bytes,
          "bits_per_weight": 8 * n_bytes / n_weights, "relative_output_error": errors,
          "seconds": time.perf_counter() - t0}


def dequantize_model(model: TransformerLM) -> TransformerLM:
  """Replaces every quantized projection by a plain nnx.Param holding its dequantized values
  (in place; returns the model): what code that reads parameters (distillation's seeding)
  needs from a quantized run's model."""
  for block in model.blocks:
    for owner in (getattr(block, "attn", None), getattr(block, "mlp", None)):
      for name in TARGETS:
        w = getattr(owner, name, None) if owner is not None else None
        if isinstance(w, IntQWeight | NF4Weight):
          axes = w.axes
          param = nnx.Param(w[...]) if axes is None else nnx.Param(w[...], axes=axes)
          setattr(owner, name, param)
  return model


def _heads(attn, u, positions):
  """The attention layer's per-head output [B, T, H, K] before wo."""
  q, k, v = attn.qkv(u, positions)
  return attention(q, k, v, mask=attn.mask(u.shape[1]), implementation=attn.cfg.attn_impl)


def apply_structure(model: TransformerLM, wq: WeightQuant) -> TransformerLM:
  """Replaces the model's projections by quantized weights of `wq`'s storage format, by
  round-to-nearest of their current values (NF4 for "nf4"): the structure a quantized run's
  checkpoint restores into (GPTQ and RTN store alike), or a quantized copy of the weights."""
  check(model, wq)
  for _, owner, name in targets(model):
    weight = getattr(owner, name)
    if wq.method == "nf4":
      setattr(owner, name, NF4Weight.from_weight(weight, TARGETS[name]))
    else:
      codes, scales, zeros = intq.quantize_rtn(_matrix(weight, TARGETS[name]), wq.bits,
                                               wq.group_size)
      _replace(owner, name, codes, scales, zeros, wq)
  return model


class _Hessian:
  """Running H = 2·XᵀX / n over calibration batches."""

  def __init__(self):
    self.sum, self.n = None, 0

  def add(self, x):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    s = 2.0 * (x.T @ x)
    self.sum = s if self.sum is None else self.sum + s
    self.n += x.shape[0]

  def value(self):
    return self.sum / self.n


def _quantize_group(owners, h, wq: WeightQuant, errors: dict, sizes: list, layer: int):
  for owner, name in owners:
    w = _matrix(getattr(owner, name), TARGETS[name])
    codes, scales, zeros = gptq(w, h, bits=wq.bits, group_size=wq.group_size, damp=wq.damp)
    d = intq.dequantize(codes, scales, zeros, wq.group_size) - w
    errors[f"{layer}.{name}"] = float(jnp.sum(d * (h @ d)) / jnp.sum(w * (h @ w)))
    sizes.append(_replace(owner, name, codes, scales, zeros, wq))


def _gptq_model(model: TransformerLM, wq: WeightQuant, calib: list, log):
  xs = [model._embed(jnp.asarray(b["inputs"])) for b in calib]
  pos = [jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]) for x in xs]
  errors, sizes = {}, []
  for i, (block, lb) in enumerate(zip(model.blocks, model._layer_bounds(), strict=True)):
    if block.kind == "attention":
      attn = block.attn
      us = [block.attn_norm(x) for x in xs]
      h = _Hessian()
      for u in us:
        h.add(u)
      _quantize_group([(attn, n) for n in ("wq", "wk", "wv")], h.value(), wq, errors, sizes, i)
      heads = [_heads(attn, u, p) for u, p in zip(us, pos, strict=True)]
      h = _Hessian()
      for o in heads:
        h.add(o.reshape(*o.shape[:2], -1))
      _quantize_group([(attn, "wo")], h.value(), wq, errors, sizes, i)
      xs = [x + attn.out(o) for x, o in zip(xs, heads, strict=True)]
    else:
      xs = [x + block.mixer(block.mixer_norm(x), None, **block._lb(lb)) for x in xs]
    mlp = block.mlp
    if mlp is not None and all(isinstance(getattr(mlp, n, None), nnx.Param)
                               for n in ("w_gate", "w_up", "w_down")):
      ms = [block.mlp_norm(x) for x in xs]
      h = _Hessian()
      for m in ms:
        h.add(m)
      _quantize_group([(mlp, "w_gate"), (mlp, "w_up")], h.value(), wq, errors, sizes, i)
      dt = mlp.compute_dtype
      acts = [jax.nn.silu(mlp.w_gate.matmul(m, 1, dt)) * mlp.w_up.matmul(m, 1, dt) for m in ms]
      h = _Hessian()
      for a in acts:
        h.add(a)
      _quantize_group([(mlp, "w_down")], h.value(), wq, errors, sizes, i)
    if mlp is not None:
      xs = [x + mlp(block.mlp_norm(x)) for x in xs]
    log(f"gptq: block {i} quantized")
  return errors, sizes
