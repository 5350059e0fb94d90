"""Where one decode step's device time goes: per-kernel totals from a JAX profiler trace.

  python scripts/profile_decode.py --out DIR [--length 16384] [--models teacher,linear]
      [--xla-flags=--xla_gpu_enable_dot_strength_reduction=false]

Builds bench_distill's models (the teacher and its students), compiles one `decode_step` with a
cache for --length tokens, times it (median of host-timed calls, as bench_distill does), then
runs it --steps more times under `jax.profiler.trace` and sums the device time of each kernel
from the trace. Prints, per model: the step time, the device time per step, and the top kernels.
The gap between the two is host-side (dispatch, argument flattening). Writes DIR/profile.json.
--xla-flags profiles the same models again in a child process with those XLA flags added (same
run, so the two are comparable), into DIR/flags/.
"""

import argparse
import collections
import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_distill  # noqa: E402

from memx.models.transformer import TransformerLM  # noqa: E402
from memx.timing import median_time  # noqa: E402


def device_kernel_times(trace_dir: pathlib.Path) -> dict[str, float]:
  """Kernel name → total microseconds on GPU streams, from the perfetto trace JSON."""
  files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("perfetto*.json.gz"))
  if not files:
    return {}
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids:
      totals[e.get("name", "?")] += float(e.get("dur", 0.0))
  return dict(totals)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--length", type=int, default=16384)
  ap.add_argument("--models", default="teacher,linear")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--n-layers", type=int, default=4)
  ap.add_argument("--xla-flags", default="",
                  help="also profile with these XLA flags added (a child process)")
  args = ap.parse_args(argv)
  cfg_args = argparse.Namespace(d_model=1024, n_layers=args.n_layers, n_heads=16, n_kv_heads=4,
                                vocab=512, every=2, chunk=128, dtype="bfloat16", batch=1)
  cfgs = bench_distill.model_configs(cfg_args)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = {}
  for name in args.models.split(","):
    model = TransformerLM(cfgs[name], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, args.length)
    cache["pos"] = jnp.asarray(args.length - 1, jnp.int32)
    token = jnp.zeros((1,), jnp.int32)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c))
    compiled = step.lower(state, token, cache).compile()
    step_s = median_time(compiled, (state, token, cache), 20)
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(args.steps):
          jax.block_until_ready(compiled(state, token, cache))
      kernels = device_kernel_times(pathlib.Path(tmp))
    per_step_us = {k: v / args.steps for k, v in kernels.items()}
    top = sorted(per_step_us.items(), key=lambda kv: -kv[1])[:15]
    report[name] = {"step_ms": step_s * 1e3, "device_us_per_step": sum(per_step_us.values()),
                    "kernels_per_step": len(per_step_us), "top_us": top,
                    "hlo_ops": compiled.as_text().count("\n")}
    print(f"{name}: step {step_s * 1e3:.3f} ms, device {sum(per_step_us.values()):.1f} us/step "
          f"over {len(per_step_us)} kernels", flush=True)
    for k, v in top:
      print(f"   {v:9.1f} us  {k[:100]}", flush=True)
    (out / f"{name}_hlo.txt").write_text(compiled.as_text())
  (out / "profile.json").write_text(json.dumps(report, indent=2))
  if args.xla_flags:
    print(f"== again with XLA_FLAGS += {args.xla_flags}", flush=True)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags))
    child = [sys.executable, __file__, "--out", str(out / "flags"), "--length", str(args.length),
             "--models", args.models, "--steps", str(args.steps), "--n-layers", str(args.n_layers)]
    return subprocess.run(child, env=env, check=False).returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
