"""BlockSizes: chunk length and tiles of the chunked SSD implementations."""

import dataclasses

from memx.kernels._blocks import check_bool, check_choice, check_launch, check_pow2


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
    block_n: state-dim (N) tile of the Pallas sequential state passes (shrunk to N).
    block_p_bwd: P tile of the chunk backward's loop (None: block_p; at most block_p). Its
      [Q, Q] and two [Q, N] fp32 accumulators fill the registers, and a narrower P tile keeps
      the per-tile temporaries from spilling (ptxas, sm_90a, Q = 64, N = 128: 372 B spilled
      at block_p 64, none at 16; `scripts/ptxas_report.py`).
    state_pass: how the Pallas kernels run the recurrence over chunk boundaries.
      "auto" (default): "sequential" when its walk has at least 128 programs (about one per
      H100 SM), else "parallel" (measured: `pallas_gpu.SEQUENTIAL_MIN_PROGRAMS`).
      "parallel": one kernel computes every chunk's own state S_c (and, backward,
      its state cotangent) in parallel over chunks, then a scan kernel walks the boundaries
      elementwise, `scan_rows` chunks per loop step; extra memory: the fp32 S_c,
      [B, T/Q, H, P, N].
      "sequential": one kernel per [block_p, block_n] state tile walks the chunks in order,
      a load and a dot per chunk; no extra buffer, but only B·H·(P/block_p)·(N/block_n)
      programs, each with T/Q dependent steps (latency-bound at long T, few heads).
    chunk_states_fp32: the parallel pass stores the chunk states S_c in fp32 (default), or in
      the input dtype (bf16 inputs: half the pass's extra traffic and memory; each S_c is then
      rounded once, as the stored boundary states already are; the scan adds in fp32).
    block_scan: elements of the flattened [P·N] state per program of the parallel scan.
    scan_rows: chunks per loop step in the parallel scan, unrolled, their row loads issued
      together (shrunk to at most T/Q; the T/Q mod scan_rows chunks left over are walked one
      per step).
    num_warps, num_stages: Triton launch settings of the forward kernels. num_warps None: 4,
      except the output kernel at chunks of 128 and more: 8 (`forward_warps`).
    num_warps_bwd, num_stages_bwd: the same for the backward kernels.
  """

  chunk: int = 64
  block_p: int = 64
  block_n: int = 32
  block_p_bwd: int | None = None
  state_pass: str = "auto"
  chunk_states_fp32: bool = True
  block_scan: int = 256
  scan_rows: int = 16
  num_warps: int | None = None
  num_stages: int = 2
  num_warps_bwd: int = 8
  num_stages_bwd: int = 1

  def __post_init__(self):
    check_pow2(self, "chunk", lo=16, why=" (the padded length is a multiple of it)")
    check_choice(self, "state_pass", ("auto", "parallel", "sequential"))
    check_bool(self, "chunk_states_fp32")
    check_pow2(self, "scan_rows", lo=1)
    check_pow2(self, "block_p_bwd", lo=16, optional=True)
    check_pow2(self, "block_p", "block_n", "block_scan", lo=16,
               why=" (Triton tensors have power-of-two sizes, dots need 16)")
    check_launch(self, warps=("num_warps_bwd",), optional_warps=("num_warps",),
                 stages=("num_stages", "num_stages_bwd"))

  def forward_warps(self, chunk: int) -> int:
    """Warps of the forward output kernel at this (effective) chunk length. It holds a
    Q x Q fp32 score tile: at Q = 128 and 4 warps that is 128 registers per thread on its own,
    and ptxas (sm_90a, the 64k student's P = N = 64) reports 255 registers and an 84-byte
    spill; 8 warps take 181 registers and no spill, at the same 8 warps per SM."""
    if self.num_warps is not None:
      return self.num_warps
    return 8 if chunk >= 128 else 4

  @classmethod
  def get_default(cls, implementation: str = "pallas_gpu") -> "BlockSizes":
    """Defaults per implementation; untuned on GPU (`scripts/bench_ssm.py` times chunks).

    Q = 64 as in flash-linear-attention's chunked kernels: at P = N = 128 the boundary states
    (T/64·P·N per head, bf16 for bf16 inputs) cost as much memory traffic as x itself, and the
    Q x Q tiles fit registers next to the state tiles. The sequential state pass has
    B·H·(P/block_p)·(N/block_n) programs (64 x 32 tiles: 128 at B=1, H=16, P=N=128, but 32
    for a P = N = 64 student), each walking T/Q chunks: on an H100 it took 4.0 of the 64k
    student prefill's 20 ms. The parallel pass spreads the chunk-state dots over all T/Q
    chunks and leaves only an elementwise scan to walk them (`scan_rows` per step).
    """
    del implementation
    return cls()
