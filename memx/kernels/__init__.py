"""Pure-JAX kernels: each op has a reference oracle, fast implementations and one dispatching API.

Import only jax, numpy, einops and jaxtyping here: never flax.
"""
