"""Every kernel's BlockSizes refuses a bad tile or launch setting when built, naming the field."""

import pytest

from memx.kernels.attention.config import BlockSizes as AttentionBlocks
from memx.kernels.linear_scan.config import BlockSizes as ScanBlocks
from memx.kernels.short_conv.config import BlockSizes as ConvBlocks
from memx.kernels.ssd.config import BlockSizes as SSDBlocks
from memx.kernels.ternary.config import BlockSizes as TernaryBlocks

BAD = [
    (AttentionBlocks, "block_q", 48, "power of two >= 16"),
    (AttentionBlocks, "block_k_dq", 8, "power of two >= 16"),
    (AttentionBlocks, "num_warps_bwd", 3, "None or one of 1, 2, 4, 8, 16"),
    (AttentionBlocks, "num_stages_fwd", 0, r"int in \[1, 8\]"),
    (AttentionBlocks, "dq_atomic", 1, "must be a bool"),
    (ScanBlocks, "chunk", 4, "power of two >= 8"),
    (ScanBlocks, "block_d", True, "power of two >= 16"),
    (ScanBlocks, "num_warps", None, "one of 1, 2, 4, 8, 16"),
    (ScanBlocks, "num_warps", True, "one of 1, 2, 4, 8, 16"),
    (AttentionBlocks, "num_warps_fwd", 4.0, "None or one of 1, 2, 4, 8, 16"),
    (ConvBlocks, "rows_bwd", 8, r"power of two >= 16 \(= block_t_bwd\)"),
    (ConvBlocks, "backward", "one", "'fused' or 'two_pass'"),
    (ConvBlocks, "num_warps_bwd", 32, "one of 1, 2, 4, 8, 16"),
    (SSDBlocks, "chunk", 100, "power of two >= 16"),
    (SSDBlocks, "block_p_bwd", 24, "None or a power of two >= 16"),
    (SSDBlocks, "state_pass", "fast", "'auto', 'parallel' or 'sequential'"),
    (SSDBlocks, "num_stages_bwd", 9, r"int in \[1, 8\]"),
    (SSDBlocks, "chunk_states_fp32", "yes", "must be a bool"),
    (TernaryBlocks, "block_k", 32, "power of two >= 64"),
    (TernaryBlocks, "split_k", 3, "power of two >= 1"),
    (TernaryBlocks, "vector", None, "must be a bool"),
]


@pytest.mark.parametrize("cls, field, value, allowed", BAD,
                         ids=[f"{c.__module__.split('.')[2]}-{f}" for c, f, _, _ in BAD])
def test_bad_block_sizes_are_refused(cls, field, value, allowed):
  with pytest.raises(ValueError, match=rf"BlockSizes\.{field} = {value!r}.*{allowed}"):
    cls(**{field: value})


@pytest.mark.parametrize("cls", [AttentionBlocks, ScanBlocks, ConvBlocks, SSDBlocks,
                                 TernaryBlocks])
def test_defaults_and_optional_fields_are_accepted(cls):
  cls()
  if cls is SSDBlocks:
    cls(num_warps=None, block_p_bwd=None)
  if cls is AttentionBlocks:
    cls(num_warps_fwd=None, num_warps_bwd=None)
