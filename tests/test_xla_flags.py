"""memx._xla_flags: the collective-order flag is added once and respects a user's own choice."""

from memx._xla_flags import CPU_COLLECTIVE_ORDER, set_cpu_flags_if_multidevice, with_cpu_flags


def test_flag_added_once_and_user_choice_kept():
  assert with_cpu_flags("") == CPU_COLLECTIVE_ORDER
  once = with_cpu_flags("--a=1")
  assert with_cpu_flags(once) == once == f"--a=1 {CPU_COLLECTIVE_ORDER}"
  mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  assert with_cpu_flags(mine) == mine
  assert with_cpu_flags("--xla_force_host_platform_device_count=2", devices=8) == (
      f"{CPU_COLLECTIVE_ORDER} --xla_force_host_platform_device_count=8")


def test_only_several_cpu_devices_get_it(monkeypatch):
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  set_cpu_flags_if_multidevice()
  assert CPU_COLLECTIVE_ORDER not in __import__("os").environ["XLA_FLAGS"]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  set_cpu_flags_if_multidevice()
  assert CPU_COLLECTIVE_ORDER in __import__("os").environ["XLA_FLAGS"]
