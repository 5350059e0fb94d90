"""BlockSizes: chunk length and tiles of the chunked SSD implementations."""

import dataclasses


def _pow2(x, lo: int) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= lo and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Chunking of the time axis and Pallas tiles.

  `chunk` is the algorithm's Q: quadratic work inside chunks is Q·T·(N + P) per head, the
  boundary states are T/Q·P·N per head, so small chunks move more state and large chunks do
  more masked matmul work. The sequence is zero-padded to a multiple of Q (padding tokens
  neither decay nor write the state), so any length works with any chunk.

  Attributes:
    chunk: tokens per chunk Q (xla and pallas_gpu); a power of two >= 16 (Triton dots need
      every dimension >= 16).
    block_p: head-dim (P) tile of the Pallas state and output kernels (shrunk to P).
    block_n: state-dim (N) tile of the Pallas state passes (shrunk to N).
    num_warps, num_stages: Triton launch settings of the forward kernels.
    num_warps_bwd, num_stages_bwd: the same for the backward kernels.
  """

  chunk: int = 64
  block_p: int = 64
  block_n: int = 32
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 8
  num_stages_bwd: int = 1

  def __post_init__(self):
    if not _pow2(self.chunk, 16):
      raise ValueError(f"BlockSizes.chunk = {self.chunk!r} is not allowed: must be a power of "
                       f"two >= 16 (the padded length is a multiple of it).")
    for f in ("block_p", "block_n"):
      v = getattr(self, f)
      if not _pow2(v, 16):
        raise ValueError(f"BlockSizes.{f} = {v!r} is not allowed: must be a power of two >= 16 "
                         f"(Triton tensors have power-of-two sizes, dots need 16).")
    for f in ("num_warps", "num_warps_bwd"):
      v = getattr(self, f)
      if v not in (1, 2, 4, 8, 16):
        raise ValueError(f"BlockSizes.{f} = {v!r} is not allowed: expected one of 1, 2, 4, 8, "
                         f"16.")
    for f in ("num_stages", "num_stages_bwd"):
      v = getattr(self, f)
      if not isinstance(v, int) or not 1 <= v <= 8:
        raise ValueError(f"BlockSizes.{f} = {v!r} is not allowed: must be an int in [1, 8].")

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu") -> "BlockSizes":
    """Defaults per implementation; untuned on GPU (`scripts/bench_ssm.py` times chunks).

    Q = 64 as in flash-linear-attention's chunked kernels: at P = N = 128 the boundary states
    (T/64·P·N per head, bf16 for bf16 inputs) cost as much memory traffic as x itself, and the
    Q x Q tiles fit registers next to the state tiles. The state passes are sequential over
    chunks, so their parallelism is B·H·(P/block_p)·(N/block_n): 64 x 32 tiles give 128
    programs at B=1, H=16, P=N=128, about one per H100 SM.
    """
    del implementation
    return cls()
