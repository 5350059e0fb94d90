"""BlockSizes: output tiles and K step of the NF4 matmul kernels (forward and dx)."""

import dataclasses

from memx.kernels._blocks import check_launch, check_pow2


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """How y[M, N] = x[M, K] @ W̃[K, N] and dx[M, K] = dy[M, N] @ W̃ᵀ are tiled when W̃ is stored
  as NF4 codes, two per byte along K.

  Attributes:
    block_m: rows of x per program, forward and backward (power of two >= 16: Triton dots;
      shrunk to the padded row count for small M).
    block_n: forward: output columns per program; backward: the N step of its loop (power of
      two >= 16). The kernels use the largest power of two in [16, block_n] dividing N
      (`pallas_gpu.n_tile`); only an N that is not a multiple of 16 is padded (a copy of the
      codes per call).
    block_k: forward: the K step of the loop (block_k / 2 packed rows per load); backward: the
      dx columns per program. A power of two >= 32 (block_k / 2 packed rows feed a Triton dot,
      whose smallest operand dimension is 16). The kernels use the largest power of two
      <= block_k that divides K and divides block_size or is a multiple of it (so a step covers
      whole quantization blocks or lies inside one); `pallas_gpu.k_step`.
    num_warps, num_stages: Triton launch settings.

  Not tuned on a GPU yet: the defaults follow the packed ternary matmul's mid-size tiles.
  """

  block_m: int = 64
  block_n: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    check_pow2(self, "block_m", "block_n", lo=16, why=" (Triton dots)")
    check_pow2(self, "block_k", lo=32, why=" (block_k / 2 packed rows feed a Triton dot)")
    check_launch(self, warps=("num_warps",), stages=("num_stages",))

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu", rows: int | None = None
                  ) -> "BlockSizes":
    """The class defaults (rows only shrinks block_m, in the kernel's plan)."""
    del implementation, rows
    return cls()
