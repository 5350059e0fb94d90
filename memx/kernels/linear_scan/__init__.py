"""Diagonal gated recurrences h_t = a_t ⊙ h_{t-1} + b_t (MLGRU, Mamba-1-style selective scans).

Implementations: reference (`lax.scan`, the oracle), xla (chunked scan with a memory-light
custom VJP, any backend), pallas_gpu (chunked Triton passes); `linear_scan` dispatches.
"""

from memx.kernels.linear_scan.api import (
    IMPLEMENTATIONS,
    Implementation,
    default_order,
    linear_scan,
)
from memx.kernels.linear_scan.config import BlockSizes
from memx.kernels.linear_scan.pallas_gpu import linear_scan_pallas_gpu
from memx.kernels.linear_scan.reference import (
    linear_scan_associative,
    linear_scan_reference,
    linear_scan_step,
)
from memx.kernels.linear_scan.xla import linear_scan_xla

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "Implementation",
    "default_order",
    "linear_scan",
    "linear_scan_associative",
    "linear_scan_pallas_gpu",
    "linear_scan_reference",
    "linear_scan_step",
    "linear_scan_xla",
]
