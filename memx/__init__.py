"""memx: a JAX/XLA research framework for memory-efficient LLM training and inference."""

__version__ = "0.1.0"
