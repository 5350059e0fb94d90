"""Shared tolerances and parity helpers for kernel tests (one table for every op).

Kernel tests compare an implementation against its op's `reference.py` on the same inputs.
Tolerances are keyed by the input dtype; gradients get 2x the forward tolerance (they go
through one more rounded matmul, as in state-spaces/mamba's tests). `atol` is relative to the
largest magnitude of the expected tensor (a gradient of size 100 is not held to 1e-5), and
`reduction_size` optionally widens it by sqrt(n / 128) for long reductions (Tokamax).
Never loosen an entry without a comment that says why.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
  atol: float   # times max(1, max |expected|)
  rtol: float


# Forward tolerances by input dtype. fp32: kernels differ from the reference only in summation
# order and exp2-vs-exp; bf16/fp16: both round probabilities to the input dtype before the PV
# matmul, but at different points of the online softmax (one ulp of bf16 is 2^-8 ~ 4e-3).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=2e-5, rtol=2e-5),
    "bfloat16": Tolerance(atol=2e-2, rtol=2e-2),
    "float16": Tolerance(atol=4e-3, rtol=4e-3),
}
GRAD_FACTOR = 2.0


def tolerance(dtype, *, grad: bool = False, reduction_size: int | None = None) -> Tolerance:
  """The tolerance for comparing results computed from inputs of `dtype`."""
  tol = TOLERANCES[jnp.dtype(dtype).name]
  factor = GRAD_FACTOR if grad else 1.0
  if reduction_size is not None and reduction_size > 128:
    factor *= math.sqrt(reduction_size / 128)
  return Tolerance(atol=tol.atol * factor, rtol=tol.rtol * factor)


def diff_summary(actual, expected) -> str:
  """max-abs / mean-abs / max-rel differences and where the worst one is."""
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  d = np.abs(a - e)
  if d.size == 0:
    return "empty arrays"
  worst = np.unravel_index(np.nanargmax(np.where(np.isnan(d), np.inf, d)), d.shape)
  rel = d / np.maximum(np.abs(e), 1e-30)
  return (f"max-abs {np.nanmax(d):.3e} at {tuple(int(i) for i in worst)} "
          f"(actual {a[worst]:.6g}, expected {e[worst]:.6g}), mean-abs {np.nanmean(d):.3e}, "
          f"max-rel {np.nanmax(rel):.3e}, max |expected| {np.abs(e).max():.3e}, "
          f"NaN in actual: {int(np.isnan(a).sum())}")


def assert_allclose(actual, expected, *, dtype=None, grad: bool = False,
                    reduction_size: int | None = None, name: str = "") -> None:
  """Asserts |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|.

  Args:
    actual, expected: arrays of the same shape (compared in fp32).
    dtype: the input dtype that sets the tolerance (default: expected's dtype).
    grad: use the gradient tolerance (2x).
    reduction_size: length of the longest reduction behind the values (widens by sqrt).
    name: what is compared, for the failure message.
  """
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  if a.shape != e.shape:
    raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
  tol = tolerance(dtype if dtype is not None else jnp.asarray(expected).dtype, grad=grad,
                  reduction_size=reduction_size)
  scale = max(1.0, float(np.abs(e).max(initial=0.0)))
  bound = tol.atol * scale + tol.rtol * np.abs(e)
  bad = ~(np.abs(a - e) <= bound)  # NaN counts as bad
  if bad.any():
    raise AssertionError(
        f"{name}: {int(bad.sum())}/{bad.size} elements outside atol={tol.atol:.1e} "
        f"(x{scale:.3g}), rtol={tol.rtol:.1e}: {diff_summary(a, e)}")


def assert_tree_allclose(actual, expected, *, dtype=None, grad: bool = False,
                         names: tuple[str, ...] | None = None) -> None:
  """assert_allclose over matching sequences (e.g. the (dq, dk, dv) cotangents)."""
  if len(actual) != len(expected):
    raise AssertionError(f"got {len(actual)} arrays, expected {len(expected)}")
  for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
    assert_allclose(a, e, dtype=dtype, grad=grad, name=names[i] if names else f"[{i}]")


# XLA:CPU spends most of a small kernel test compiling loops through LLVM's optimiser; tests
# only need the numbers, so on CPU they compile with the cheapest settings (about 3x faster).
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_for_test(fn):
  """jax.jit(fn), compiled with FAST_CPU_COMPILE when the default backend is the CPU."""
  jitted = jax.jit(fn)

  def run(*args):
    if jax.default_backend() != "cpu":
      return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=FAST_CPU_COMPILE)(*args)
  return run


def abstract_h100_mesh():
  """A one-device abstract mesh of an H100, for lowering Pallas kernels to Triton IR on CPU
  (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` inside use_abstract_mesh)."""
  from jax._src import mesh as mesh_lib  # AbstractDevice is not re-exported in jax 0.11
  device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="gpu")
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
