"""Assembled models and their configs (transformer LM; hybrids and MatMul-free LMs later)."""
