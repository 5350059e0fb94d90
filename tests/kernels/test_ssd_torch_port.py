"""memx SSD against an independent PyTorch port of Mamba-2's minimal chunked SSD.

The Mamba-2 paper (Dao & Gu 2024, §6, "SSD minimal") gives the chunked algorithm in ~25 lines of
PyTorch: intra-chunk quadratic form, chunk states, a chunk-level recurrence written as one
segment-sum matrix, then state-to-output. It is written here from that description, in float64,
and compared with memx's `reference` (a lax.scan) and `xla` (chunked, custom VJP) on random
inputs. Needs PyTorch (`pip install torch`); skipped otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.ssd import ssd

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _segsum(a):
  """[..., L] → [..., L, L]: out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above."""
  length = a.shape[-1]
  cs = torch.cumsum(a, dim=-1)
  out = cs[..., :, None] - cs[..., None, :]
  keep = torch.tril(torch.ones(length, length, dtype=torch.bool))
  return out.masked_fill(~keep, -torch.inf)


def ssd_minimal_torch(x, a, b, c, chunk, h0=None):
  """x [B, T, H, P] (already × Δ), a [B, T, H] (Δ·A), b, c [B, T, H, N]; T % chunk == 0.

  Returns (y [B, T, H, P], final state [B, H, P, N])."""
  bsz, t, h, p = x.shape
  n = b.shape[-1]
  nc = t // chunk
  x, b, c = (z.reshape(bsz, nc, chunk, h, -1) for z in (x, b, c))
  a = a.reshape(bsz, nc, chunk, h).permute(0, 3, 1, 2)  # [B, H, C, L]
  a_cum = torch.cumsum(a, dim=-1)
  # 1. within each chunk: the masked quadratic ("attention") form
  decay = torch.exp(_segsum(a))  # [B, H, C, L, L]
  y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", c, b, decay, x)
  # 2. each chunk's final state, from its own tokens only
  to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [B, H, C, L]
  states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, to_end, x)
  # 3. the chunk-level recurrence, as one segment-sum over chunk totals
  if h0 is None:
    h0 = torch.zeros(bsz, 1, h, p, n, dtype=x.dtype)
  else:
    h0 = h0[:, None]
  states = torch.cat([h0, states], dim=1)  # [B, C+1, H, P, N]
  totals = torch.nn.functional.pad(a_cum[..., -1], (1, 0))  # [B, H, C+1]
  chunk_decay = torch.exp(_segsum(totals))  # [B, H, C+1, C+1]
  states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
  states, final = states[:, :-1], states[:, -1]
  # 4. the state entering each chunk, read out at every token of it
  y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", c, states, torch.exp(a_cum))
  return (y_diag + y_off).reshape(bsz, t, h, p), final


def _inputs(bsz=2, t=48, h=4, p=8, g=2, n=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(ks[0], (bsz, t, h, p))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (bsz, t, h)) - 1.0)
  a = -jnp.exp(jax.random.normal(ks[2], (h,)) * 0.5)
  b = jax.random.normal(ks[3], (bsz, t, g, n)) * 0.5
  c = jax.random.normal(ks[4], (bsz, t, g, n)) * 0.5
  d = jax.random.normal(ks[5], (h,))
  h0 = jax.random.normal(ks[6], (bsz, h, p, n)) * 0.3
  return x, dt, a, b, c, d, h0


def _torch_oracle(x, dt, a, b, c, d, h0, chunk):
  t64 = lambda z: torch.from_numpy(np.asarray(z, np.float64))  # noqa: E731
  x, dt, a, b, c, d, h0 = map(t64, (x, dt, a, b, c, d, h0))
  heads_per_group = x.shape[2] // b.shape[2]
  b = b.repeat_interleave(heads_per_group, dim=2)  # group → heads
  c = c.repeat_interleave(heads_per_group, dim=2)
  y, final = ssd_minimal_torch(x * dt[..., None], dt * a, b, c, chunk, h0)
  y = y + d[None, None, :, None] * x
  return y.numpy(), final.numpy()


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_ssd_matches_the_pytorch_minimal_ssd(impl):
  x, dt, a, b, c, d, h0 = _inputs()
  want_y, want_final = _torch_oracle(x, dt, a, b, c, d, h0, chunk=16)
  y, final = ssd(x, dt, a, b, c, d=d, initial_state=h0, implementation=impl)
  _testing.assert_allclose(y, want_y, dtype=jnp.float32, reduction_size=48, name="y")
  _testing.assert_allclose(final, want_final, dtype=jnp.float32, reduction_size=48,
                           name="final state")


def test_torch_port_is_chunk_independent():
  """The port itself is consistent: chunk 8 and chunk 48 (one chunk) give the same result."""
  args = _inputs(seed=3)
  y8, f8 = _torch_oracle(*args, chunk=8)
  y48, f48 = _torch_oracle(*args, chunk=48)
  np.testing.assert_allclose(y8, y48, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(f8, f48, rtol=1e-10, atol=1e-10)
