"""GPTQ (Frantar et al., 2023): one-shot quantization of a weight matrix with second-order error
compensation, and round-to-nearest (RTN) as its baseline.

For a layer y = x·W with W [K, N] (K inputs) and calibration inputs X [n, K], GPTQ minimises
‖X·W − X·Ŵ‖² over quantized Ŵ. With H = 2·XᵀX / n it quantizes W one input row k at a time and
moves that row's rounding error onto the rows not yet quantized, in proportion to the inverse
Hessian: with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),

  e_k = (W[k] − Ŵ[k]) / U[k, k]
  W[j] −= U[k, j] · e_k            for every row j > k

which is the optimal update of the remaining rows (OBS) written with the Cholesky rows, so no
inverse is ever updated. Rows run in blocks of `block` (128): inside a block the update reaches
the block's rows at once; the rows after it take the block's accumulated errors in one matmul
at its end (the paper's lazy batch update: the same result, far fewer memory passes).

Quantization is memx.kernels.intq's: asymmetric integers over each group's range widened to
hold 0, in groups of `group_size` consecutive rows per column. A group's scale and zero are
fixed from the (already error-compensated) rows of the group when its first row is reached, as
in the paper's grouped variant; groups never straddle a block (a block is a whole number of
groups), so those rows are current. H's dead inputs (a zero diagonal: an input that is always 0) get
H[k, k] = 1 and W[k] = 0; the diagonal is dampened by damp·mean(diag H) (the paper's 1%).

Left out: act-order (quantizing rows by decreasing H[k, k]) with groups needs a per-row group
index in the stored format, which memx.kernels.intq does not have.
"""

import functools

import jax
import jax.numpy as jnp

from memx.kernels import intq

BLOCK = 128


def hessian(x: jax.Array) -> jax.Array:
  """H = 2·XᵀX / n from inputs x [..., K] (float32)."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return 2.0 * (x.T @ x) / x.shape[0]


def block_rows(k: int, group_size: int) -> int:
  """Rows per lazy-update block: the largest whole number of groups that divides K and is at
  most max(BLOCK, group_size), so that no group straddles two blocks."""
  groups = k // group_size
  return group_size * max(c for c in range(1, groups + 1)
                          if groups % c == 0 and c * group_size <= max(BLOCK, group_size))


def check(w_shape, bits: int, group_size: int) -> None:
  k = w_shape[0]
  if len(w_shape) != 2:
    raise ValueError(f"gptq: W must be a matrix [K, N]; got shape {tuple(w_shape)}")
  if bits not in (2, 3, 4, 8):
    raise ValueError(f"gptq: bits = {bits} is not supported; use 2, 3, 4 or 8")
  if group_size < 1 or k % group_size:
    raise ValueError(f"gptq: K = {k} rows are not a whole number of groups of {group_size}; "
                     "use a group size that divides K")


def gptq(w: jax.Array, h: jax.Array, *, bits: int, group_size: int, damp: float = 0.01):
  """Quantizes W [K, N] against the Hessian h [K, K] of its inputs.

  Returns (codes uint8 [K, N], scales float32 [K / group_size, N], zeros float32 [same]) in
  memx.kernels.intq's format, so Ŵ = intq.dequantize(codes, scales, zeros, group_size)."""
  check(w.shape, bits, group_size)
  if h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"gptq: H must be [K, K] = {(w.shape[0],) * 2} for W {tuple(w.shape)}; "
                     f"got {tuple(h.shape)}")
  if not 0 <= damp < 1:
    raise ValueError(f"gptq: damp = {damp} must lie in [0, 1)")
  return _gptq(w.astype(jnp.float32), h.astype(jnp.float32), bits=bits, group_size=group_size,
               damp=damp)


def inverse_cholesky(h: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
  """(U upper with H⁻¹ = UᵀU for the dampened H, the dead-input mask)."""
  k = h.shape[0]
  diag = jnp.diagonal(h)
  dead = diag == 0
  h = jnp.where(jnp.diag(dead), 1.0, h)
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
  low = jnp.linalg.cholesky(h)
  eye = jnp.eye(k, dtype=h.dtype)
  low_inv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
  hinv = low_inv.T @ low_inv
  return jnp.linalg.cholesky(hinv).T, dead


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "damp"))
def _gptq(w, h, *, bits: int, group_size: int, damp: float):
  k, n = w.shape
  u, dead = inverse_cholesky(h, damp)
  w = jnp.where(dead[:, None], 0.0, w)
  b = block_rows(k, group_size)
  g = group_size
  codes, scales, zeros = [], [], []
  for i1 in range(0, k, b):
    i2 = i1 + b
    ub = u[i1:i2, i1:i2]

    def row(i, carry, ub=ub):
      wb, qb, errs, sc, ze = carry
      gi = i // g

      def new_params(_):
        rows = jax.lax.dynamic_slice_in_dim(wb, gi * g, g, 0)
        s, z = intq.group_params(jnp.min(rows, axis=0), jnp.max(rows, axis=0), bits)
        return (jax.lax.dynamic_update_slice_in_dim(sc, s[None], gi, 0),
                jax.lax.dynamic_update_slice_in_dim(ze, z[None], gi, 0))

      sc, ze = jax.lax.cond(i % g == 0, new_params, lambda _: (sc, ze), None)
      s, z = sc[gi], ze[gi]
      wi = wb[i]
      q = intq.quantize_with(wi[None], s[None], z[None], bits)[0]
      deq = (q.astype(jnp.float32) - z) * s
      err = (wi - deq) / ub[i, i]
      # rows after i inside the block (row i's own coefficient is masked off)
      coef = jnp.where(jnp.arange(b) > i, ub[i], 0.0)
      wb = wb - coef[:, None] * err[None, :]
      return wb, qb.at[i].set(q), errs.at[i].set(err), sc, ze

    carry = (w[i1:i2], jnp.zeros((b, n), jnp.uint8), jnp.zeros((b, n), jnp.float32),
             jnp.zeros((b // g, n), jnp.float32), jnp.zeros((b // g, n), jnp.float32))
    _, qb, errs, sc, ze = jax.lax.fori_loop(0, b, row, carry)
    codes.append(qb)
    scales.append(sc)
    zeros.append(ze)
    if i2 < k:  # the lazy batch update of every later row
      w = w.at[i2:].add(-(u[i1:i2, i2:].T @ errs))
  return jnp.concatenate(codes), jnp.concatenate(scales), jnp.concatenate(zeros)


def rtn(w: jax.Array, *, bits: int, group_size: int):
  """Round-to-nearest with the same format (codes, scales, zeros)."""
  check(w.shape, bits, group_size)
  return intq.quantize_rtn(w.astype(jnp.float32), bits, group_size)


def output_error(x: jax.Array, w: jax.Array, w_hat: jax.Array) -> float:
  """‖X·W − X·Ŵ‖² / n: what GPTQ minimises (x [..., K])."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  d = x @ (w.astype(jnp.float32) - w_hat.astype(jnp.float32))
  return float(jnp.sum(d * d) / x.shape[0])
