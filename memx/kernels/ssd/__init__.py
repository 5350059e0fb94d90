"""Mamba-2 state-space duality (SSD), and causal / scalar-gated linear attention through it.

Implementations: reference (`lax.scan` recurrence, the oracle), quadratic (the masked attention
form, a second oracle), xla (chunked algorithm with a memory-light custom VJP, any backend),
pallas_gpu (fused Triton chunk kernels); `ssd` and `linear_attention` dispatch among them.
"""

from memx.kernels.ssd.api import (
    IMPLEMENTATIONS,
    Implementation,
    default_order,
    linear_attention,
    ssd,
    ssd_core,
)
from memx.kernels.ssd.config import BlockSizes
from memx.kernels.ssd.reference import (
    associative_scan_states,
    ssd_quadratic_form,
    ssd_reference,
    ssd_scan,
    ssd_step,
)

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "Implementation",
    "associative_scan_states",
    "default_order",
    "linear_attention",
    "ssd",
    "ssd_core",
    "ssd_quadratic_form",
    "ssd_reference",
    "ssd_scan",
    "ssd_step",
]
