"""The teacher's side of distillation: one forward that also returns what the student matches.

`teacher_pass` runs the frozen teacher and returns, for each converted layer, the mixer input
(the attention layer's normed hidden state u) and the attention output (after wo), plus the
logits. Layer-wise stages feed u to the student mixer of the same layer (teacher forcing), so
every converted layer is distilled independently of the others. `calibrate` measures what
seeding needs (memx.distill.seed.LayerStats).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.data.documents import model_kwargs
from memx.distill.seed import LayerStats
from memx.kernels.attention import attention
from memx.models.transformer import TransformerLM


def _positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def teacher_pass(teacher: TransformerLM, tokens: jax.Array, layers: tuple[int, ...], *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
  """(logits [B,T,V], {layer: u [B,T,D]}, {layer: attention output [B,T,D]}).

  Equals teacher(tokens, positions=, segment_ids=) on the logits (tests/distill checks it);
  the layers in `layers` must be attention layers. Call it outside any gradient (or under
  stop_gradient): the teacher is never differentiated.
  """
  positions = _positions(tokens) if positions is None else positions
  x = teacher._embed(tokens)
  inputs, outputs = {}, {}
  for i, (block, lb) in enumerate(zip(teacher.blocks, teacher._layer_bounds(), strict=True)):
    if i in layers:
      u = block.attn_norm(x)
      a = block.attn(u, positions, segment_ids)
      inputs[i], outputs[i] = u, a
      x = block._mlp(x + a)
    else:
      x = block(x, positions, segment_ids, lb)
  return teacher._logits(x), inputs, outputs


def attention_heads(attn, u: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """The attention layer's per-head output [B,T,H,K] before wo (one device, no sharding)."""
  q, k, v = attn.qkv(u, positions)
  return attention(q, k, v, mask=attn.mask(u.shape[1]), segment_ids=segment_ids,
                   implementation=attn.cfg.attn_impl)


def layer_statistics(teacher: TransformerLM, batch: dict, layers: tuple[int, ...]):
  """Per converted layer: (sum of u [D], sum of squared head outputs [H], count, positive-gate
  count) over one batch ({"inputs"} and, under document masks, positions and segment ids);
  `calibrate` combines batches."""
  tokens, kw = batch["inputs"], model_kwargs(batch)
  _, inputs, _ = teacher_pass(teacher, tokens, layers, **kw)
  positions = kw.get("positions", _positions(tokens))
  out = {}
  for i in layers:
    u = inputs[i].astype(jnp.float32)
    heads = attention_heads(teacher.blocks[i].attn, inputs[i], positions,
                            kw.get("segment_ids")).astype(jnp.float32)
    out[i] = (jnp.sum(u, axis=(0, 1)), jnp.sum(jnp.square(heads), axis=(0, 1, 3)),
              jnp.asarray(u.shape[0] * u.shape[1], jnp.float32), u)
  return out


def calibrate(teacher: TransformerLM, batches: list, layers: tuple[int, ...]):
  """({layer: LayerStats}, {layer: fraction of calibration tokens whose mean-aimed gate is
  positive}) from teacher activations on `batches` (loader batches: "inputs" [B, T] and, under
  document masks, "positions" and "segment_ids")."""
  graphdef, state = nnx.split(teacher)
  # The teacher's arrays are an argument, not constants baked into the program.
  stats_fn = jax.jit(lambda st, batch: layer_statistics(nnx.merge(graphdef, st), batch, layers))
  sums, sq, count, us = {}, {}, {}, {i: [] for i in layers}
  for batch in batches:
    batch = {"inputs": batch["inputs"], **model_kwargs(batch)}
    for i, (s, q, n, u) in stats_fn(state, batch).items():
      sums[i] = sums.get(i, 0.0) + s
      sq[i] = sq.get(i, 0.0) + q
      count[i] = count.get(i, 0.0) + n
      us[i].append(u)
  stats, positive = {}, {}
  k = teacher.cfg.head_dim
  for i in layers:
    mean = sums[i] / count[i]
    stats[i] = LayerStats(input_mean=mean, head_rms=jnp.sqrt(sq[i] / (count[i] * k)))
    u = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in us[i]], axis=0)
    positive[i] = float(jnp.mean((u @ mean) > 0))
  return stats, positive
