"""BlockSizes: output tile and K step of the packed ternary matmul kernels."""

import dataclasses

from memx.kernels._blocks import check_bool, check_launch, check_pow2


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """How y[M, N] = x[M, K] @ W[K, N] is tiled when W is packed 4 weights per byte along K.

  Attributes:
    block_m, block_n: output tile of one Pallas program (powers of two >= 16: Triton dots).
    block_k: unpacked K rows per inner step; the program loads block_k / 4 packed rows, so
      block_k is a power of two >= 64 (16 packed rows, Triton's smallest dot operand).
    split_k: programs sharing one output tile, each over K / split_k (a power of two; shrunk
      to the largest power of two dividing the K steps, so K is never padded for it):
      partial sums (int32 or fp32) are added after the kernel. At decode sizes the
      [M, N] output has only N / block_n tiles, too few programs to stream the weight from
      every SM; splitting K multiplies them.
    vector: decode-sized rows on the CUDA cores instead of tensor-core dots (see `pallas_gpu`):
      one activation row per program (block_m is not used; a few rows re-read the weight tile
      from L2), x read in place (no 16-row padding, no permutation). With int8 x two columns
      share each int32 multiply (16-bit lanes). K slices need not divide the K steps here.
    num_warps, num_stages: Triton launch settings.
  """

  block_m: int = 64
  block_n: int = 128
  block_k: int = 256
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  vector: bool = False

  def __post_init__(self):
    check_bool(self, "vector")
    check_pow2(self, "block_m", "block_n", lo=16)
    check_pow2(self, "block_k", lo=64, why=" (block_k / 4 packed rows feed a Triton dot)")
    check_pow2(self, "split_k", lo=1)
    check_launch(self, warps=("num_warps",), stages=("num_stages",))

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu", rows: int | None = None
                  ) -> "BlockSizes":
    """Tiles for an [rows, K] activation, picked by `bench_matmulfree.py --sweep`, K = 4096,
    N = 4096 or 11008 (ms against the class defaults 64x128x256 in the same run unless noted):
    decode-sized inputs stream the weights through many narrow programs, large ones take big
    tiles for operand reuse.

    rows <= 4     vector, 64 columns, K step 256, K split 8 (M = 1: 0.0068 vs 0.0109 ms for
                  the previous 16x64x256 split-8 dot default, per-call device time, H100,
                  session 9; split 4: 0.0080, split 2: 0.0120, split 1: 0.0212)
    rows <= 8     16x64, K step 256, K split 8  (M = 1: 0.0105 vs 0.0181 ms for the previous
                  16x64x512 default, per-call device time, H100, session 8: 8 x the programs)
    rows <= 16    16x64,  K step 256            (M = 16:   0.102 vs 0.222 ms, H200)
    rows <= 1024  64x64,  K step 256            (M = 256:  0.158 vs 0.409 ms, H200)
    more          128x128, K step 256, 8 warps  (M = 4096: 1.12 vs 1.61 ms, H200)
    rows None: the class defaults.
    """
    del implementation
    if rows is None:
      return cls()
    if rows <= 4:
      return cls(block_n=64, block_k=256, split_k=8, vector=True)
    if rows <= 8:
      return cls(block_m=16, block_n=64, block_k=256, split_k=8)
    if rows <= 16:
      return cls(block_m=16, block_n=64, block_k=256)
    if rows <= 1024:
      return cls(block_m=64, block_n=64, block_k=256)
    return cls(block_m=128, block_n=128, block_k=256, num_warps=8)
