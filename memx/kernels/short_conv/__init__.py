"""Short causal depthwise convolution over time (Mamba's conv1d) with a fused activation.

Implementations: reference (token-by-token window, the oracle), xla (shifted slices fused by
XLA, any backend, autodiff), pallas_gpu (tiled Triton kernels, hand-written backward);
`causal_conv` dispatches.
"""

from memx.kernels.short_conv.api import (
    IMPLEMENTATIONS,
    Implementation,
    causal_conv,
    default_order,
)
from memx.kernels.short_conv.config import BlockSizes
from memx.kernels.short_conv.pallas_gpu import causal_conv_pallas_gpu
from memx.kernels.short_conv.reference import ACTIVATIONS, causal_conv_reference
from memx.kernels.short_conv.xla import causal_conv_xla

__all__ = [
    "ACTIVATIONS",
    "IMPLEMENTATIONS",
    "BlockSizes",
    "Implementation",
    "causal_conv",
    "causal_conv_pallas_gpu",
    "causal_conv_reference",
    "causal_conv_xla",
    "default_order",
]
