"""memx._device.memory_limit: the byte budget of up-front memory checks."""

import os

from memx._device import memory_limit


def test_memory_limit_on_cpu_falls_back_to_host_memory():
  assert memory_limit() is None  # the CPU backend reports no allocator limit
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert memory_limit(host_fallback=True) == host > 2**30
