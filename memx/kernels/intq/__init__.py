"""Group-wise affine integer weights, as GPTQ and round-to-nearest (RTN) post-training
quantization store them: 2/3/4/8-bit codes with a float32 scale and integer zero point per group
of `group_size` consecutive rows along K, packed along K, and a matmul on the packed codes.

Implementations of the matmul: reference (dequantize the whole weight, then one dot), xla (a
few hundred rows dequantized at a time), pallas_gpu (tiles decoded in registers); `intq_matmul`
dispatches. The quantized base is frozen: the matmul is differentiable in x only. 3-bit codes
are computed exactly as 3-bit but stored in 4-bit containers (`bits_per_weight` counts 4).
"""

from memx.kernels.intq.api import IMPLEMENTATIONS, Implementation, default_order, intq_matmul
from memx.kernels.intq.config import BlockSizes
from memx.kernels.intq.pallas_gpu import intq_matmul_pallas_gpu
from memx.kernels.intq.reference import (
    BITS,
    bits_per_weight,
    codes_per_byte,
    container_bits,
    dequantize,
    group_params,
    intq_matmul_reference,
    pack,
    quantize_rtn,
    quantize_with,
    unpack,
)
from memx.kernels.intq.xla import intq_matmul_xla

__all__ = [
    "BITS",
    "IMPLEMENTATIONS",
    "BlockSizes",
    "Implementation",
    "bits_per_weight",
    "codes_per_byte",
    "container_bits",
    "default_order",
    "dequantize",
    "group_params",
    "intq_matmul",
    "intq_matmul_pallas_gpu",
    "intq_matmul_reference",
    "intq_matmul_xla",
    "pack",
    "quantize_rtn",
    "quantize_with",
    "unpack",
]
