"""What the accelerator (or host) can hold: the budget that up-front memory checks compare to."""

import os

import jax


def memory_limit(*, host_fallback: bool = False) -> int | None:
  """Bytes the first device may allocate (its allocator's `bytes_limit`), or None where the
  backend reports no memory stats (CPU). host_fallback=True answers such backends with the
  host's physical memory instead (what a CPU computation can at most use)."""
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
      return int(stats["bytes_limit"])
  except Exception:  # noqa: BLE001 - backends without memory stats
    pass
  if not host_fallback:
    return None
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None
