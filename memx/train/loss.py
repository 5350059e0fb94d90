"""Weighted next-token cross-entropy and answer accuracy, in float32."""

import jax
import jax.numpy as jnp

from memx.kernels.cross_entropy import cross_entropy
from memx.nn._params import DTYPES
from memx.parallel.axes import BATCH, SEQ, VOCAB
from memx.parallel.constrain import constrain
from memx.typing import Array, Bool, Float, Int


def token_losses(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]) -> Float[Array, "B T"]:
  """-log softmax(logits)[target]; the log-sum-exp is taken in fp32."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked


def weight_total(weights: Float[Array, "B T"]) -> jax.Array:
  """The denominator of a batch's weighted mean (at least 1: a batch without weight gives 0)."""
  return jnp.maximum(jnp.sum(weights), 1.0)


def weighted_mean(values: Float[Array, "B T"], weights: Float[Array, "B T"],
                  total: jax.Array | None = None) -> jax.Array:
  """sum(values · weights) / total, total = weight_total(weights) unless given: a microbatch
  passes its whole batch's, so the microbatches' shares add up to the batch's mean."""
  return jnp.sum(values * weights) / (weight_total(weights) if total is None else total)


def answer_hits(logits: Float[Array, "B T V"], targets: Int[Array, "B T"],
                answer_mask: Bool[Array, "B T"]) -> tuple[jax.Array, jax.Array]:
  """(correct answers, answer positions): greedy prediction equals the target."""
  correct = (jnp.argmax(logits, axis=-1) == targets) & answer_mask
  return jnp.sum(correct), jnp.sum(answer_mask)


def lm_token_losses(model, inputs: Int[Array, "B T"], targets: Int[Array, "B T"], *,
                    positions: Int[Array, "B T"] | None = None,
                    segment_ids: Int[Array, "B T"] | None = None,
                    vocab_block: int = 0) -> Float[Array, "B T"]:
  """Per-token losses of a memx LM: from its full logits, or (vocab_block > 0) over vocabulary
  blocks so the [B, T, V] logits never exist whole (memx.kernels.cross_entropy).
  segment_ids: documents of a row (memx.data.documents), or None for one sequence per row."""
  features = model.features(inputs, positions=positions, segment_ids=segment_ids)
  return feature_losses(model, features, targets, vocab_block)


def feature_losses(model, features: Float[Array, "B T D"], targets: Int[Array, "B T"],
                   vocab_block: int = 0) -> Float[Array, "B T"]:
  """Per-token losses of final-normed hidden states through the model's output projection
  (lm_token_losses after the model's blocks; local learning's auxiliary losses)."""
  if not vocab_block:
    return token_losses(constrain(model.project(features), (BATCH, SEQ, VOCAB)), targets)
  w, layout = model.head_weight()
  return cross_entropy(features, w, targets, vocab_block=vocab_block,
                       compute_dtype=DTYPES[model.cfg.compute_dtype], w_layout=layout)
