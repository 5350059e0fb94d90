"""scripts/profile_model.py: the trace parser sums device kernels only, and a CPU run writes its
report (no GPU kernels there, so the totals are empty but every phase is listed)."""

import gzip
import json


def test_device_kernel_times_sums_gpu_events_only(tmp_path, load_script):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "fusion_1", "dur": 3.0},
      {"ph": "X", "pid": 1, "name": "fusion_1", "dur": 4.5},
      {"ph": "X", "pid": 1, "name": "gemm", "dur": 2.0},
      {"ph": "X", "pid": 2, "name": "fusion_1", "dur": 100.0},   # host-side: not counted
      {"ph": "i", "pid": 1, "name": "marker"},                    # not a complete event
  ]
  trace = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
  trace.parent.mkdir(parents=True)
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  profile_model = load_script("scripts/profile_model.py")
  assert profile_model.device_kernel_times(tmp_path) == {"fusion_1": 7.5, "gemm": 2.0}
  assert profile_model.device_kernel_times(tmp_path / "plugins" / "none") == {}


def test_cpu_run_writes_every_phase(tmp_path, load_script):
  profile_model = load_script("scripts/profile_model.py")
  profile_model.main(["--out", str(tmp_path), "--length", "64", "--n-layers", "2", "--steps", "1",
                      "--models", "linear", "--prefill-length", "64"])
  report = json.loads((tmp_path / "profile.json").read_text())
  assert set(report) == {"linear decode", "linear prefill"}
  assert all(r["ms"] > 0 for r in report.values())
  assert (tmp_path / "linear_prefill_hlo.txt").exists()


def test_kernel_hlo_ops_and_their_source(tmp_path, load_script):
  """A kernel's `hlo_op` trace arguments name its HLO instructions, whose op_name metadata in
  the compiled text says what jax op they came from."""
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "name": "loop_multiply_fusion_6", "dur": 3.0,
       "args": {"hlo_op": "loop_multiply_fusion.6", "hlo_module": "jit_prefill"}},
      {"ph": "X", "pid": 1, "name": "loop_multiply_fusion_6", "dur": 3.0,
       "args": {"hlo_op": "loop_multiply_fusion.9"}},
      {"ph": "X", "pid": 1, "name": "gemm", "dur": 2.0},
  ]
  trace = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
  trace.parent.mkdir(parents=True)
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  profile_model = load_script("scripts/profile_model.py")
  from memx.timing import device_kernel_hlo_ops
  ops = device_kernel_hlo_ops(tmp_path)
  assert ops == {"loop_multiply_fusion_6": ["loop_multiply_fusion.6", "loop_multiply_fusion.9"]}
  hlo = ('  %loop_multiply_fusion.6 = bf16[2]{0} fusion(%p), kind=kLoop, calls=%f, '
         'metadata={op_name="jit(prefill)/jit(silu)/mul" stack_frame_id=3}\n'
         '  %loop_multiply_fusion.60 = bf16[2]{0} fusion(%p), metadata={op_name="other"}\n')
  assert profile_model.op_name_of(hlo, "loop_multiply_fusion.6") == "jit(prefill)/jit(silu)/mul"
  assert profile_model.op_name_of(hlo, "loop_multiply_fusion.9") == "?"
