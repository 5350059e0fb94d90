"""Two processes on loopback save and restore one globally sharded state (collective)."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent / "fixtures" / "two_process.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multidevice
@pytest.mark.parametrize("mode", [
    "lazy", pytest.param("sync", marks=pytest.mark.slow), pytest.param("async",
                                                                       marks=pytest.mark.slow)])
def test_two_process_save_and_restore(tmp_path, mode):
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[2])}
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(pid), str(port),
                             str(tmp_path / "ckpt"), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=180)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("two-process checkpoint test timed out")
  for pid, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0 and f"process {pid}: ok" in out, out[-2000:]
