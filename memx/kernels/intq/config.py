"""BlockSizes: output tiles and K step of the integer-weight matmul kernels (forward and dx)."""

import dataclasses

from memx.kernels._blocks import check_launch, check_pow2


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """How y[M, N] = x[M, K] @ W̃[K, N] and dx[M, K] = dy[M, N] @ W̃ᵀ are tiled when W̃ is stored
  as packed integer codes along K (per = 4, 2, 2, 1 codes per byte at bits = 2, 3, 4, 8).

  Attributes:
    block_m: rows of x per program, forward and backward (power of two >= 16: Triton dots;
      shrunk to the padded row count for small M).
    block_n: forward: output columns per program; backward: the N step of its loop (power of
      two >= 16). The kernels use the largest power of two in [16, block_n] dividing N
      (`pallas_gpu.n_tile`); only an N that is not a multiple of 16 is padded (a copy of the
      stored arrays per call).
    block_k: forward: the K step of the loop; backward: the dx columns per program, in weight
      rows. A power of two >= 16. A step decodes block_k / per packed rows per plane, each plane
      feeding a Triton dot whose smallest dimension is 16, so the kernels need a step of at
      least 16·per rows (64 at 2 bits, 32 at 3 and 4, 16 at 8): they use the largest power of
      two in [16·per, block_k] that divides K and divides group_size or is a multiple of it
      (`pallas_gpu.k_step`).
    num_warps, num_stages: Triton launch settings.

  Not tuned on a GPU yet: the defaults follow the NF4 matmul's mid-size tiles.
  """

  block_m: int = 64
  block_n: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    check_pow2(self, "block_m", "block_n", lo=16, why=" (Triton dots)")
    check_pow2(self, "block_k", lo=16, why=" (block_k / per packed rows feed a Triton dot)")
    check_launch(self, warps=("num_warps",), stages=("num_stages",))

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu", rows: int | None = None
                  ) -> "BlockSizes":
    """The class defaults (rows only shrinks block_m, in the kernel's plan)."""
    del implementation, rows
    return cls()
