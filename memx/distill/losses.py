"""Distillation losses and agreement, in float32.

layer_mse: teacher-forced layer-wise MSE (stages 1–2); kl_divergence: KL(teacher ‖ student) over
temperature-softened logits, scaled by τ² so its gradient magnitude does not shrink with τ
(Hinton et al. 2015); top1_agreement: how often the two argmax predictions coincide.
"""

import jax
import jax.numpy as jnp

from memx.typing import Array, Float


def layer_mse(student: dict[int, jax.Array], teacher: dict[int, jax.Array]) -> jax.Array:
  """Mean over layers of mean((student_l − teacher_l)²); both {layer: [B, T, D]}."""
  terms = [jnp.mean(jnp.square(student[i].astype(jnp.float32) - teacher[i].astype(jnp.float32)))
           for i in sorted(teacher)]
  return jnp.mean(jnp.stack(terms))


def kl_divergence(teacher_logits: Float[Array, "B T V"], student_logits: Float[Array, "B T V"],
                  temperature: float = 1.0) -> jax.Array:
  """τ² · mean over tokens of Σ_v p_T (log p_T − log p_S), p = softmax(logits / τ).

  Zero exactly when the two distributions agree; ≥ 0 always.
  """
  t = teacher_logits.astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def top1_agreement(teacher_logits: Float[Array, "B T V"],
                   student_logits: Float[Array, "B T V"]) -> jax.Array:
  """Fraction of tokens where the student's argmax equals the teacher's."""
  same = jnp.argmax(teacher_logits, axis=-1) == jnp.argmax(student_logits, axis=-1)
  return jnp.mean(same.astype(jnp.float32))
