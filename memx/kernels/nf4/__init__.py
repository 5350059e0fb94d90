"""4-bit NormalFloat (NF4) weights, as in QLoRA: blockwise quantization to the 16 NF4 levels,
two codes per byte, double quantization of the block scales, and a matmul on the packed codes.

Implementations of the matmul: reference (dequantize the whole weight, then one dot), xla
(one K chunk dequantized at a time), pallas_gpu (tiles decoded in registers); `nf4_matmul`
dispatches. The quantized base is frozen: the matmul is differentiable in x only.
"""

from memx.kernels.nf4.api import IMPLEMENTATIONS, Implementation, default_order, nf4_matmul
from memx.kernels.nf4.config import BlockSizes
from memx.kernels.nf4.pallas_gpu import nf4_matmul_pallas_gpu
from memx.kernels.nf4.reference import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GROUP_SIZE,
    NF4_LEVELS,
    bits_per_weight,
    dequantize,
    dequantize_absmax,
    nearest_level,
    nf4_matmul_reference,
    pack_nibbles,
    quantize,
    quantize_absmax,
    unpack_nibbles,
)
from memx.kernels.nf4.xla import nf4_matmul_xla

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GROUP_SIZE",
    "IMPLEMENTATIONS",
    "NF4_LEVELS",
    "BlockSizes",
    "Implementation",
    "bits_per_weight",
    "default_order",
    "dequantize",
    "dequantize_absmax",
    "nearest_level",
    "nf4_matmul",
    "nf4_matmul_pallas_gpu",
    "nf4_matmul_reference",
    "nf4_matmul_xla",
    "pack_nibbles",
    "quantize",
    "quantize_absmax",
    "unpack_nibbles",
]
