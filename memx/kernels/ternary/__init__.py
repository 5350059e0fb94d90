"""Ternary (1.58-bit) weights: absmean/absmax quantizers with straight-through gradients,
2-bit packing (4 weights per byte; `to_words` reads them as int32 words) and a matmul on packed
weights.

Implementations of the packed matmul: reference (unpack, then one dot), xla (one bit plane at
a time), pallas_gpu (decodes in registers); `packed_matmul` dispatches. `bitlinear` is the
training op (RMSNorm → int8 → ternary matmul, straight-through), whose `xla` form keeps only
its input for the backward pass.
"""

from memx.kernels.ternary.api import IMPLEMENTATIONS, Implementation, default_order, packed_matmul
from memx.kernels.ternary.bitlinear import bitlinear, bitlinear_reference, bitlinear_xla
from memx.kernels.ternary.config import BlockSizes
from memx.kernels.ternary.pallas_gpu import packed_matmul_pallas_gpu
from memx.kernels.ternary.reference import (
    absmax_quantize,
    absmean_quantize,
    from_words,
    int8_fake_quant,
    pack_ternary,
    packed_matmul_reference,
    packed_rows,
    ternary_fake_quant,
    to_words,
    unpack_ternary,
)
from memx.kernels.ternary.xla import packed_matmul_xla

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "Implementation",
    "absmax_quantize",
    "absmean_quantize",
    "bitlinear",
    "bitlinear_reference",
    "bitlinear_xla",
    "from_words",
    "default_order",
    "int8_fake_quant",
    "pack_ternary",
    "packed_matmul",
    "packed_matmul_pallas_gpu",
    "packed_matmul_reference",
    "packed_matmul_xla",
    "packed_rows",
    "ternary_fake_quant",
    "to_words",
    "unpack_ternary",
]
