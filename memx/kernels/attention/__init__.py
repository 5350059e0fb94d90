"""Softmax attention: dense, windowed, sink, segment and GQA masks behind one API."""

from memx.kernels.attention.api import Implementation, attention
from memx.kernels.attention.mask import CAUSAL, Mask
from memx.kernels.attention.reference import MASK_VALUE, attention_reference

__all__ = ["CAUSAL", "MASK_VALUE", "Implementation", "Mask", "attention", "attention_reference"]
