"""Softmax attention: dense, windowed, sink, segment, per-head and block-sparse masks, one API.

Implementations: reference (dense oracle), xla (blockwise FA2, any backend), pallas_gpu
(Triton kernels), cudnn (jax.nn.dot_product_attention); `attention` dispatches among them.
`chunk_attention` (chunk.py): a query chunk at a run-time offset over a KV cache, forward only
(chunked prefill inside a scan).
"""

from memx.kernels.attention.api import IMPLEMENTATIONS, Implementation, attention, default_order
from memx.kernels.attention.chunk import chunk_attention
from memx.kernels.attention.config import BlockSizes
from memx.kernels.attention.mask import (
    CAUSAL,
    EMPTY,
    FULL,
    PARTIAL,
    BlockSparse,
    Mask,
    elastic_mask,
    elastic_span,
    moa_windows,
)
from memx.kernels.attention.pallas_gpu import attention_pallas_gpu
from memx.kernels.attention.reference import MASK_VALUE, attention_reference
from memx.kernels.attention.xla import attention_xla

__all__ = [
    "CAUSAL",
    "EMPTY",
    "FULL",
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "PARTIAL",
    "BlockSizes",
    "BlockSparse",
    "Implementation",
    "Mask",
    "attention",
    "attention_pallas_gpu",
    "attention_reference",
    "attention_xla",
    "chunk_attention",
    "elastic_mask",
    "elastic_span",
    "default_order",
    "moa_windows",
]
