"""BlockSizes: chunk length and channel tile of the chunked linear-scan implementations."""

import dataclasses

from memx.kernels._blocks import check_launch, check_pow2


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """How the time axis is chunked and the channel axis tiled.

  The chunked scans split T into chunks of `chunk` steps: a pass over each chunk's tokens gives
  the chunk's product of gates and its local state, a short recurrence over chunks gives every
  chunk's starting state, and a second pass over the tokens writes h. `chunk` trades the
  length of that recurrence (T / chunk steps) against per-chunk work.

  Attributes:
    chunk: time steps per chunk (xla and pallas_gpu). Power of two >= 8.
    block_d: channels per Pallas program (a power of two >= 16; shrunk to the padded D).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the per-step loads.
  """

  chunk: int = 64
  block_d: int = 256
  num_warps: int = 2
  num_stages: int = 3

  def __post_init__(self):
    check_pow2(self, "chunk", lo=8)
    check_pow2(self, "block_d", lo=16, why=" (Triton tensors have power-of-two sizes)")
    check_launch(self, warps=("num_warps",), stages=("num_stages",))

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu") -> "BlockSizes":
    """Defaults per implementation (untuned on GPU; `scripts/bench_ssm.py` times them).

    xla: 64-step chunks, about sqrt(T) at T = 4096, which balances the in-chunk pass against
    the sequential recurrence over chunks. pallas_gpu: 64-step chunks and 256 channels on 2 warps
    (4 consecutive fp32 per thread: 16-byte loads) give B·T/64·D/256 programs (1536 at B=4,
    T=4096, D=1536): about 12 small programs per H100 SM, whose independent loads hide each
    other's latency.
    """
    del implementation
    return cls()
