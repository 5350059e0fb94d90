"""BlockSizes: the time and channel tile of the Pallas short-convolution kernels."""

import dataclasses

from memx.kernels._blocks import check_choice, check_launch, check_pow2


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tiles of the forward and backward kernels.

  The convolution is element-wise along channels and W taps long along time, so the kernels
  are pure memory traffic: each program reads its tile of x once from DRAM (the W shifted
  re-reads of it hit L1/L2) and writes its tile once. The backward's first (or only) kernel
  walks `rows_bwd` rows per program in sub-tiles of `block_t_bwd`, summing its share of dw and
  dbias in registers, so the per-program partial sums XLA adds up stay small
  (T / rows_bwd · W · C floats). Two-pass (default) it writes g = dy ⊙ act'(pre), rounded to
  x's dtype, and a second kernel on the forward's tiles sums g's W shifts into dx; fused, it
  recomputes the pre-activation at the W shifts it needs (W² cached loads per element) and
  writes dx itself.

  Registers decide the tiles (`scripts/ptxas_report.py --family conv`): every tap of a tile is
  live at once, so elements per thread (block_t · block_c / (32 · num_warps)) times W must fit.

  Attributes:
    block_t: forward time steps per program (power of two >= 8).
    block_c: channels per program (power of two >= 16; shrunk to the padded channel count).
      Channels are the contiguous axis: 128 bf16 channels are a 256-byte row.
    num_warps: Triton warps per forward program.
    block_t_bwd: backward sub-tile (power of two >= 8).
    rows_bwd: rows per backward program (power of two, a multiple of block_t_bwd).
    num_warps_bwd: Triton warps per backward program.
    backward: "fused" (one kernel, recomputes the pre-activation at each of the W shifts) or
      "two_pass" (writes g = dy ⊙ act'(pre) once, then a second kernel sums its W shifts).
  """

  block_t: int = 32
  block_c: int = 128
  num_warps: int = 4
  block_t_bwd: int = 16
  rows_bwd: int = 256
  num_warps_bwd: int = 8
  backward: str = "two_pass"

  def __post_init__(self):
    check_pow2(self, "block_t", "block_t_bwd", lo=8)
    check_pow2(self, "block_c", lo=16, why=" (Triton tensors have power-of-two sizes)")
    check_pow2(self, "rows_bwd", lo=self.block_t_bwd, why=" (= block_t_bwd)")
    check_choice(self, "backward", ("fused", "two_pass"))
    check_launch(self, warps=("num_warps", "num_warps_bwd"))

  @classmethod
  def get_default(cls) -> "BlockSizes":
    """Forward 32 × 128 on 4 warps (32 elements per thread, 128 registers, no spill);
    backward 16 × 128 sub-tiles on 8 warps, 256 rows per program, two passes. Chosen offline
    from sm_90a SASS (ptxas_report): the fused backward issues ~157 instructions per element,
    the two passes ~62 for 10 bytes of traffic instead of 6, which on an H100 (~0.9 T warp
    instructions/s, 3.35 TB/s) estimates ~0.2 ms against ~0.37 at 64k × 1024. Not yet timed
    on a GPU (`scripts/bench_ssm.py --kinds conv --sweep` times both)."""
    return cls()
