"""XLA flags that must be set before JAX starts its backend (no jax import here).

XLA:CPU runs a step's independent operations concurrently. With its concurrency-optimized
scheduler, two independent collectives of one step (FSDP's parameter all-gather and ring
attention's collective permute) can start in different orders on different devices, and each
device then waits for a peer that waits in the other collective: the run aborts after 40 s
with "Termination timeout ... for `all gather ...`". Measured on the fsdp2 × sp4 ring train
step (8 CPU devices, 2 cores): 3 of 3 runs hung without the flag, 0 of 3 with it, at no
measurable cost in step time (577–615 ms with it, 637–693 ms in the runs that did not hang
without it). GPU backends ignore it.

Set by the CLI (when several CPU devices are asked for), bench_parallel and launch_local.sh.
The test suite keeps XLA's default: with the flag, one test's compiled-memory bound failed
(ring attention's per-device memory) and the suite ran 19.7 minutes instead of about 7 (with
a cold compilation cache on a loaded machine; the share of each cause was not isolated).
"""

import os
import re

CPU_COLLECTIVE_ORDER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def with_cpu_flags(flags: str, *, devices: int | None = None) -> str:
  """`flags` plus the scheduler flag (unless set), and `devices` fake CPU devices if given
  (replacing any device count already there)."""
  parts = [f for f in flags.split()
           if devices is None or not f.startswith("--xla_force_host_platform_device_count")]
  if not any(f.startswith("--xla_cpu_enable_concurrency_optimized_scheduler") for f in parts):
    parts.append(CPU_COLLECTIVE_ORDER)
  if devices is not None:
    parts.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(parts)


def set_cpu_flags(*, devices: int | None = None) -> None:
  """Updates os.environ["XLA_FLAGS"]; call before the first JAX computation."""
  os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""), devices=devices)


def set_cpu_flags_if_multidevice() -> None:
  """set_cpu_flags() when the environment asks for several CPU devices (one device runs no
  collectives, and keeps XLA's default schedule)."""
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  n = max(int(m.group(1)) if m else 1, int(os.environ.get("JAX_NUM_CPU_DEVICES", "1") or 1))
  if n > 1:
    set_cpu_flags()
