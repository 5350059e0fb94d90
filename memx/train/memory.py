"""Memory accounting: the compiled step's buffers and, on GPU, the device's peak bytes."""

import jax
import numpy as np


def compiled_memory(compiled) -> dict[str, int | None]:
  """argument / output / temp / generated-code bytes of a compiled executable."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {"argument_bytes": None, "output_bytes": None, "temp_bytes": None,
            "alias_bytes": None, "generated_code_bytes": None}
  return {"argument_bytes": int(ma.argument_size_in_bytes),
          "output_bytes": int(ma.output_size_in_bytes),
          "alias_bytes": int(ma.alias_size_in_bytes),
          "temp_bytes": int(ma.temp_size_in_bytes),
          "generated_code_bytes": int(ma.generated_code_size_in_bytes)}


def peak_device_bytes() -> int | None:
  """Peak bytes in use on the first local device (GPU/TPU); None where unsupported (CPU)."""
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    return None
  stats = dev.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def saved_activation_bytes(fn, *args) -> int:
  """Bytes autodiff keeps from fn's forward for its backward pass, inputs not counted.

  Exact and backend-independent (read off the linearized program, nothing compiled), so it
  isolates what a model's structure costs in activation memory from how one compiler happens
  to schedule its temporaries. fn must return a scalar or pytree differentiable w.r.t. args.
  """
  try:  # public in some jax versions
    from jax.ad_checkpoint import saved_residuals
  except ImportError:
    from jax._src.ad_checkpoint import saved_residuals
  return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize
             for aval, source in saved_residuals(fn, *args)
             if "from the argument" not in source)
