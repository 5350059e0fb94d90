"""Test helpers for layers and models: an nnx-aware jit compiled with cheap CPU options."""

import jax
from flax import nnx

from memx.kernels._testing import FAST_CPU_COMPILE


def jit_for_test(fn):
  """jit of fn(module, *args) that splits the module, caches executables by graph and argument
  shapes, and on CPU compiles with FAST_CPU_COMPILE (tests need the numbers, not the speed)."""
  compiled = {}

  def run(module, *args):
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree.flatten((state, args))
    key = (graphdef, tree, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x)))
                                 for x in leaves))
    if key not in compiled:
      def pure(state, args):
        return fn(nnx.merge(graphdef, state), *args)
      lowered = jax.jit(pure).lower(state, args)
      opts = FAST_CPU_COMPILE if jax.default_backend() == "cpu" else None
      compiled[key] = lowered.compile(compiler_options=opts)
    return compiled[key](state, args)

  return run
