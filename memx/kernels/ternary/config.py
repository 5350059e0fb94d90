"""BlockSizes: output tile and K step of the packed ternary matmul kernels."""

import dataclasses


def _pow2(x, lo: int) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= lo and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """How y[M, N] = x[M, K] @ W[K, N] is tiled when W is packed 4 weights per byte along K.

  Attributes:
    block_m, block_n: output tile of one Pallas program (powers of two >= 16: Triton dots).
    block_k: unpacked K rows per inner step; the program loads block_k / 4 packed rows, so
      block_k is a power of two >= 64 (16 packed rows, Triton's smallest dot operand).
    num_warps, num_stages: Triton launch settings.
  """

  block_m: int = 64
  block_n: int = 128
  block_k: int = 256
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for f in ("block_m", "block_n"):
      v = getattr(self, f)
      if not _pow2(v, 16):
        raise ValueError(f"BlockSizes.{f} = {v!r} is not allowed: must be a power of two >= 16.")
    if not _pow2(self.block_k, 64):
      raise ValueError(f"BlockSizes.block_k = {self.block_k!r} is not allowed: must be a power "
                       f"of two >= 64 (block_k / 4 packed rows feed a Triton dot).")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"BlockSizes.num_warps = {self.num_warps!r} is not allowed: expected one "
                       f"of 1, 2, 4, 8, 16.")
    if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
      raise ValueError(f"BlockSizes.num_stages = {self.num_stages!r} is not allowed: must be an "
                       f"int in [1, 8].")

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu") -> "BlockSizes":
    """Untuned defaults: 64x128 output tiles, 256-deep K steps (64 packed bytes per column)."""
    del implementation
    return cls()
