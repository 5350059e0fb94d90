"""Bad input to the kernel APIs is refused before any compute, with what was wrong."""

import jax
import jax.numpy as jnp
import pytest

from memx.kernels.attention import CAUSAL, chunk_attention
from memx.kernels.cross_entropy import cross_entropy
from memx.kernels.linear_scan import linear_scan
from memx.kernels.norms import rms_norm
from memx.kernels.short_conv import causal_conv
from memx.kernels.ssd import linear_attention, ssd
from memx.kernels.ternary import bitlinear, pack_ternary, packed_matmul

F = jnp.float32


def _ssd_args(b=1, t=8, h=2, p=4, g=1, n=4):
  return (jnp.ones((b, t, h, p), F), jnp.ones((b, t, h), F), -jnp.ones((h,), F),
          jnp.ones((b, t, g, n), F), jnp.ones((b, t, g, n), F))


@pytest.mark.parametrize("case, call, match", [
    ("bitlinear integer compute dtype",
     lambda: bitlinear(jnp.ones((2, 8)), jnp.ones((8,)), jnp.ones((8, 4)),
                       compute_dtype=jnp.int8), "compute_dtype"),
    ("bitlinear misspelt implementation",
     lambda: bitlinear(jnp.ones((2, 8)), jnp.ones((8,)), jnp.ones((8, 4)),
                       implementation=("xal", "reference")), "unknown implementation 'xal'"),
    ("cross_entropy misspelt implementation",
     lambda: cross_entropy(jnp.ones((2, 8)), jnp.ones((8, 16)), jnp.zeros((2,), jnp.int32),
                           implementation=("xal", "reference")), "unknown implementation 'xal'"),
    ("rms_norm scale of another width",
     lambda: rms_norm(jnp.ones((2, 8)), jnp.ones((4,))), r"scale g \[D\]"),
    ("rms_norm scale of rank 2",
     lambda: rms_norm(jnp.ones((2, 8)), jnp.ones((1, 8))), r"scale g \[D\]"),
    ("rms_norm integer input",
     lambda: rms_norm(jnp.ones((2, 8), jnp.int32), jnp.ones((8,))), "float array"),
    ("chunk before the cache",
     lambda: chunk_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 16, 2, 8)),
                             jnp.ones((1, 16, 2, 8)), -8, mask=CAUSAL), "start = -8"),
    ("chunk past the cache",
     lambda: chunk_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 16, 2, 8)),
                             jnp.ones((1, 16, 2, 8)), 14, mask=CAUSAL), "S - C = 12"),
    ("packed matmul with K = 0",
     lambda: packed_matmul(jnp.ones((2, 0), jnp.int8), pack_ternary(jnp.ones((4, 4), jnp.int8))),
     "K = 0"),
    ("linear attention with a NaN scale",
     lambda: linear_attention(*(jnp.ones((1, 8, 2, 4)),) * 3, scale=float("nan")),
     "finite number"),
    ("linear attention with a string scale",
     lambda: linear_attention(*(jnp.ones((1, 8, 2, 4)),) * 3, scale="2"), "scale must be"),
    ("ssd with an empty batch", lambda: ssd(*_ssd_args(b=0)), "empty dimension"),
    ("ssd with P = 0", lambda: ssd(*_ssd_args(p=0)), "empty dimension"),
    ("linear_scan with D = 0",
     lambda: linear_scan(jnp.ones((2, 5, 0)), jnp.ones((2, 5, 0))), "empty dimension"),
    ("causal_conv with an empty batch",
     lambda: causal_conv(jnp.ones((0, 5, 4)), jnp.ones((4, 4)), None), "empty dimension"),
])
def test_bad_input_is_refused_with_the_reason(case, call, match):
  with pytest.raises((ValueError, NotImplementedError), match=match):
    call()


def test_chunk_attention_keeps_a_traced_start():
  q, kv = jnp.ones((1, 4, 2, 8)), jnp.ones((1, 16, 2, 8))
  out = jax.jit(lambda s: chunk_attention(q, kv, kv, s, mask=CAUSAL))(jnp.int32(12))
  assert out.shape == q.shape


def test_rms_norm_gradient_through_the_checked_entry():
  x, g = jax.random.normal(jax.random.key(0), (3, 8)), jnp.linspace(0.5, 1.5, 8)
  dx, dg = jax.grad(lambda x, g: jnp.sum(rms_norm(x, g) ** 2), argnums=(0, 1))(x, g)
  assert dx.shape == x.shape and dg.shape == g.shape
