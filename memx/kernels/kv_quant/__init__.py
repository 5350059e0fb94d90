"""Quantized KV caches for decoding (KIVI): keys per channel, values per token, in b-bit codes.

KIVI (Liu et al., 2024) finds that keys have outlier channels (a few channels are large for
every token) while values do not, so it quantizes keys per channel, over groups of G
consecutive tokens, and values per token, over groups of consecutive channels; both
asymmetric (x̂ = code · scale + zero, zero = the group's minimum, scale = its range / (2^b - 1),
so |x - x̂| <= scale / 2), tuning-free, at 2 or 4 bits. Keys of a group can only be quantized
once the group's G tokens exist, so the newest (incomplete) group stays in full precision, and
with it the R most recent tokens before it (KIVI's residual, e.g. R = 128; `KVQuant.residual`,
default 0).

`QuantCache`, one attention layer's cache for max_len tokens, L = ceil(max_len / G) · G slots:
  k_codes, v_codes   uint8 [B, L, Hkv, W], W = K · bits / 8: 8 / bits codes per byte, planar
                     (channel f · W + j in byte j at bit f · bits: `pack`)
  k_scale, k_zero    [B, L / G, Hkv, K]: per token group and channel (compute dtype)
  v_scale, v_zero    [B, L, Hkv, K / Gv]: per token and channel group, Gv = min(G, K)
  k_res, v_res       [B, R + G, Hkv, K]: a ring at full precision, position p in slot
                     p mod (R + G)

What a read sees. A read at position pos takes positions from exact_from(pos) =
max(0, G · floor(pos / G) - R) on exactly as computed (from the ring), earlier ones dequantized.
A decode step writes its key/value into the ring first, so it reads its own group, itself
included, at full precision; when the step completes a group (pos mod G = G - 1), the group
R / G groups back leaves the window: it is quantized into the codes, and later steps read it
from there. A prefill chunk attends to its own keys at full
precision and to what earlier chunks left in the cache as stored: so a prompt prefilled whole
sees itself exactly (as KIVI's prefill does) and only generated tokens read quantized keys.

Decode attention over the cache (`decode_attention`): `reference` reads the layer whole
(`QuantCache.read`: dequantized into the compute dtype, one layer's keys and values as a
temporary) and runs dense masked scores; it is the oracle and the CPU path. `pallas_gpu`
(pallas_gpu.py) reads the codes and dequantizes them in registers, so a step's memory traffic
is the quantized bytes (`quant_cache_bytes`), which also bound batch and context.
"""

from memx.kernels.kv_quant.api import IMPLEMENTATIONS, decode_attention
from memx.kernels.kv_quant.cache import QuantCache, init_quant_cache, quant_cache_bytes
from memx.kernels.kv_quant.codes import (
    BITS,
    KVQuant,
    dequantize,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize,
    quantize_keys,
    quantize_values,
    unpack,
)

__all__ = ["BITS", "IMPLEMENTATIONS", "KVQuant", "QuantCache", "decode_attention", "dequantize",
           "dequantize_keys", "dequantize_values", "init_quant_cache", "pack", "quant_cache_bytes",
           "quantize", "quantize_keys", "quantize_values", "unpack"]
