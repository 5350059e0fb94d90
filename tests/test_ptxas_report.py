"""scripts/ptxas_report.py: lowers the Pallas kernels on CPU and reads ptxas's register report
(needs the pip `triton` package, an optional tool dependency)."""

import pytest


@pytest.mark.slow
def test_ssd_report_lists_every_kernel_with_registers(load_script, capsys):
  pytest.importorskip("triton")
  report = load_script("scripts/ptxas_report.py")
  report.FAMILIES["ssd"] = (lambda: {"parallel": report.ssd_candidates()["parallel"]},
                            report.lower_ssd)
  assert report.main(["--family", "ssd", "--seq", "256"]) == 0
  lines = capsys.readouterr().out.splitlines()
  kernels = {line.split()[1] for line in lines}
  assert kernels == {"memx_ssd_chunk_states", "memx_ssd_state_scan", "memx_ssd_out_fwd",
                     "memx_ssd_chunk_states_bwd", "memx_ssd_state_scan_bwd",
                     "memx_ssd_chunk_bwd"}
  assert all("regs" in line and "spill stores" in line for line in lines)
