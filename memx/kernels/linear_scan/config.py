"""BlockSizes: chunk length and channel tile of the chunked linear-scan implementations."""

import dataclasses


def _pow2(x, lo: int) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= lo and x & (x - 1) == 0


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
    if not _pow2(self.chunk, 8):
      raise ValueError(f"BlockSizes.chunk = {self.chunk!r} is not allowed: must be a power of "
                       f"two >= 8.")
    if not _pow2(self.block_d, 16):
      raise ValueError(f"BlockSizes.block_d = {self.block_d!r} is not allowed: must be a power "
                       f"of two >= 16 (Triton tensors have power-of-two sizes).")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"BlockSizes.num_warps = {self.num_warps!r} is not allowed: expected one "
                       f"of 1, 2, 4, 8, 16.")
    if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
      raise ValueError(f"BlockSizes.num_stages = {self.num_stages!r} is not allowed: must be an "
                       f"int in [1, 8].")

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
