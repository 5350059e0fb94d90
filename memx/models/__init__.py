"""Assembled models and their configs: the decoder-only LM with attention, Mamba-2, linear
attention or hybrid token mixers (`ModelConfig.mixers`), `factory.build_model`, decoding
(`decode.generate`; `speculative.speculative_generate` with a draft model; `memx generate`),
and packed 2-bit checkpoints of ternary (MatMul-free) models (`packed`).

Kept import-free: memx.nn imports memx.models.config, so this package must not import layers.
"""
