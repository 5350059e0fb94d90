"""BlockSizes: the tile sizes and launch settings of the blockwise attention implementations."""

import dataclasses

from memx.kernels._blocks import check_bool, check_launch, check_pow2
from memx.kernels.attention.mask import Mask

# (field, tiles the query axis?) for every tile field.
_TILE_FIELDS = (("block_q", True), ("block_k", False), ("block_q_dkv", True),
                ("block_k_dkv", False), ("block_q_dq", True), ("block_k_dq", False))


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tiles of the score matrix that one program (Pallas) or one loop step (xla) handles.

  Every size is a power of two >= 16: Triton tensors must have power-of-two sizes and its dot
  needs M, N, K >= 16. The forward and the dQ pass tile by (query block, key block) with the
  query block on the grid and a loop over key blocks; the dK/dV pass puts the key block on the
  grid and loops over query blocks, so each pass has its own pair.

  Attributes:
    block_q, block_k: forward tiles.
    block_q_dkv, block_k_dkv: dK/dV tiles (the xla backward's single pass uses these).
    block_q_dq, block_k_dq: dQ tiles (pallas_gpu only).
    num_warps_fwd, num_warps_bwd: Triton warps per program; None = 4 for head dim <= 64, else 8.
    num_stages_fwd, num_stages_bwd: Triton software-pipelining depth of the key/query loop.
    dq_atomic: pallas_gpu only. The dK/dV pass also accumulates dQ, with fp32 atomic adds,
      and the dQ pass is skipped: 5 tile matmuls in the backward instead of 7 (the dQ pass
      recomputes QKᵀ and dO Vᵀ), for an fp32 dQ buffer and a summation order that varies from
      run to run. Off by default until a GPU sweep shows it faster.
    exp2_ftz: pallas_gpu only (compiled). Every exponential in the kernels is one
      `ex2.approx.ftz.f32` (inline PTX, what Triton's own exp2 emits), not jnp.exp2's libdevice
      call, which may keep denormal handling around each exp depending on how XLA sets the
      flush-to-zero flag. Results below 2^-126 flush to 0 (the probabilities they stand for
      add nothing at fp32 precision). Off by default until a GPU sweep shows it faster.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 64
  num_warps_fwd: int | None = None
  num_warps_bwd: int | None = None
  num_stages_fwd: int = 3
  num_stages_bwd: int = 2
  dq_atomic: bool = False
  exp2_ftz: bool = False

  def __post_init__(self):
    check_pow2(self, *(f for f, _ in _TILE_FIELDS), lo=16)
    check_launch(self, optional_warps=("num_warps_fwd", "num_warps_bwd"),
                 stages=("num_stages_fwd", "num_stages_bwd"))
    check_bool(self, "dq_atomic", "exp2_ftz")

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu", *, itemsize: int | None = None,
                  head_dim: int | None = None) -> "BlockSizes":
    """Defaults per implementation.

    pallas_gpu: the tiles that made JAX's stock Pallas-Triton attention fastest on an H100
    (research/anchors_attention.md §2.1: fwd 128x64, dK/dV 64x128, dQ 128x64, 8 warps at
    head dim 128), with one change measured on memx's kernels (`bench_attention.py --sweep`,
    H200, jax 0.11.2, bf16, 1x16384, 16 heads of 128): 2-byte inputs with a (padded) head
    dim <= 128 take 128-key forward tiles, forward 3.84 -> 3.21 ms causal and 1.17 -> 1.03 ms
    at MoA 25% density. (Larger heads or fp32 would overflow the 227 KB of shared memory with
    three pipeline stages.) No backward candidate beat the default tiles in sessions 7 and 9,
    but those candidates also had 128x64 forward tiles (built on BlockSizes(), not on this
    default), which confounds the comparison; the sweep now changes one thing at a time.
    xla: larger tiles, since each tile is one step of an XLA loop with fixed overhead.
    """
    if implementation == "xla":
      return cls(block_q=512, block_k=512, block_q_dkv=512, block_k_dkv=512,
                 block_q_dq=512, block_k_dq=512)
    if itemsize == 2 and head_dim is not None and head_dim <= 128:
      return cls(block_k=128)
    return cls()

  def fit(self, t: int, s: int, mask: Mask | None = None, *, explicit: bool = False
          ) -> "BlockSizes":
    """Shrinks tiles to the problem (no tile beyond next_pow2(T or S)) and to the layout.

    With a block-sparse mask every kernel tile must nest inside a layout block. Defaults are
    shrunk until they do; explicit sizes that do not are a ValueError (they were asked for).
    """
    cap_q, cap_k = max(16, _next_pow2(t)), max(16, _next_pow2(s))
    lq = lk = None
    if mask is not None and mask.block_sparse is not None:
      lq, lk = mask.block_sparse.block_q, mask.block_sparse.block_k
    changes = {}
    for f, is_q in _TILE_FIELDS:
      v = getattr(self, f)
      layout_block = lq if is_q else lk
      if layout_block is not None and layout_block % v:
        if explicit:
          raise ValueError(
              f"BlockSizes.{f} = {v} does not fit the block-sparse layout: layout blocks are "
              f"({lq}, {lk}) and every kernel tile must divide them.")
        while layout_block % v:
          v //= 2
        if v < 16:
          raise ValueError(f"Block-sparse layout block {layout_block} has no power-of-two "
                           f"divisor >= 16 to use as a kernel tile.")
      v = min(v, cap_q if is_q else cap_k)
      if v != getattr(self, f):
        changes[f] = v
    return dataclasses.replace(self, **changes) if changes else self
