"""RoPE against its definition (RoFormer eq. 34), in complex float64."""

import jax.numpy as jnp
import numpy as np

from memx.nn.rope import apply_rope


def test_rope_is_the_complex_rotation_of_half_split_pairs():
  # Pair i is (x_i, x_{i + K/2}), rotated by pos · theta^(-2i/K). The decode and causality
  # tests call apply_rope on both sides, so a wrong frequency or layout passes them.
  rng = np.random.default_rng(0)
  b, t, h, k, theta = 2, 7, 3, 16, 10000.0
  x = rng.standard_normal((b, t, h, k))
  pos = rng.integers(0, 512, (b, t))
  angle = pos[..., None] * theta ** (-2.0 * np.arange(k // 2) / k)
  rotated = (x[..., :k // 2] + 1j * x[..., k // 2:]) * np.exp(1j * angle)[:, :, None, :]
  want = np.concatenate([rotated.real, rotated.imag], -1)
  got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta=theta)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
