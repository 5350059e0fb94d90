"""Where a model's device time goes: per-kernel totals from a JAX profiler trace.

  python scripts/profile_model.py --out DIR [--length 16384] [--models teacher,linear]
      [--prefill-length 65536] [--xla-flags=--xla_gpu_enable_dot_strength_reduction=false]

Builds bench_distill's models (the teacher and its students) and, as `matmulfree`, a MatMul-free
LM of the same width and depth in its packed inference form. Decode: compiles one
`decode_step` with a cache for --length tokens, times it (median of host-timed calls), then runs
it --steps more times under `jax.profiler.trace` and sums the device time of each kernel from
the trace; the gap between step time and device time is host-side (dispatch, argument
flattening). Prefill (--prefill-length > 0): the same for `prefill` of that many tokens, 3 runs.
Prints per model and phase the time, the device time and the top kernels, and writes
DIR/profile.json and each compiled HLO (DIR/<model>_<phase>_hlo.txt, to look up a kernel).
--xla-flags profiles the same models again in a child process with those XLA flags added (same
run, so the two are comparable), into DIR/flags/.
"""

import argparse
import functools
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_distill  # noqa: E402

from memx._io import write_json  # noqa: E402
from memx.models.config import matmulfree_config  # noqa: E402
from memx.models.packed import pack_model  # noqa: E402
from memx.models.transformer import TransformerLM  # noqa: E402
from memx.timing import (  # noqa: E402
  device_kernel_hlo_ops,
  device_kernel_times,
  feeding_back,
  median_time,
)


def op_name_of(hlo_text: str, instruction: str) -> str:
  """The op_name metadata of `%instruction = ...` in compiled HLO text ('?' if absent)."""
  m = re.search(r"%" + re.escape(instruction) + r" = [^\n]*?op_name=\"([^\"]*)\"", hlo_text)
  return m.group(1) if m else "?"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--length", type=int, default=16384)
  ap.add_argument("--models", default="teacher,linear")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--n-layers", type=int, default=4)
  ap.add_argument("--prefill-length", type=int, default=0,
                  help="also profile prefill of this many tokens (0: decode only)")
  ap.add_argument("--xla-flags", default="",
                  help="also profile with these XLA flags added (a child process)")
  args = ap.parse_args(argv)
  cfg_args = argparse.Namespace(d_model=1024, n_layers=args.n_layers, n_heads=16, n_kv_heads=4,
                                vocab=512, every=2, chunk=128, dtype="bfloat16", batch=1)
  cfgs = bench_distill.model_configs(cfg_args, names=args.models.split(","))
  cfgs["matmulfree"] = matmulfree_config(vocab_size=512, d_model=1024, n_layers=args.n_layers,
                                         n_heads=16, compute_dtype="bfloat16",
                                         param_dtype="bfloat16")
  unknown = [n for n in args.models.split(",") if n not in cfgs]
  if unknown:
    ap.error(f"--models: unknown {unknown}; choose from teacher, linear, hybrid2, matmulfree")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = {}

  def profile(name, phase, fn, args_, runs, carry=None):
    """carry: (argument index, output index) of a state that is donated and fed back, as a
    decode loop's cache is (else every call would copy it whole)."""
    donate = () if carry is None else (carry[0],)
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args_).compile()
    call = (functools.partial(compiled, *args_) if carry is None
            else feeding_back(compiled, args_, *carry))
    step_s = median_time(call, (), max(3, runs))
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(runs):
          jax.block_until_ready(call())
      kernels = device_kernel_times(pathlib.Path(tmp))
      hlo_ops = device_kernel_hlo_ops(pathlib.Path(tmp))
    per_run_us = {k: v / runs for k, v in kernels.items()}
    top = sorted(per_run_us.items(), key=lambda kv: -kv[1])[:15]
    hlo = compiled.as_text()
    # What each top kernel computes: its HLO instructions' op_name metadata (the jax source op).
    sources = {k: [f"{op}: {op_name_of(hlo, op)}" for op in hlo_ops.get(k, [])[:4]]
               for k, _ in top}
    report[f"{name} {phase}"] = {"ms": step_s * 1e3, "device_us": sum(per_run_us.values()),
                                 "kernels": len(per_run_us), "top_us": top, "sources": sources}
    print(f"{name} {phase}: {step_s * 1e3:.3f} ms, device {sum(per_run_us.values()):.1f} us "
          f"over {len(per_run_us)} kernels", flush=True)
    for k, v in top:
      print(f"   {v:9.1f} us  {k[:100]}  {'; '.join(sources[k])[:160]}", flush=True)
    (out / f"{name}_{phase}_hlo.txt").write_text(hlo)
    # Saved after every profile: a time limit keeps what finished.
    write_json(out / "profile.json", report)

  for name in args.models.split(","):
    model = TransformerLM(cfgs[name], rngs=nnx.Rngs(0))
    if name == "matmulfree":
      pack_model(model)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, args.length)
    token = jnp.zeros((1,), jnp.int32)
    last = jnp.asarray(args.length - 1, jnp.int32)  # every call: the step at the last position

    def decode(s, t, c, graphdef=graphdef, last=last):
      return nnx.merge(graphdef, s).decode_step(t, {**c, "pos": last})
    profile(name, "decode", decode, (state, token, cache), args.steps, carry=(2, 1))
    if args.prefill_length:
      n = args.prefill_length
      tokens = jnp.zeros((1, n), jnp.int32)

      def prefill(s, t, n=n, graphdef=graphdef):
        return nnx.merge(graphdef, s).prefill(t, n, last_logits=True)

      profile(name, "prefill", prefill, (state, tokens), 3)
  write_json(out / "profile.json", report)
  if args.xla_flags:
    print(f"== again with XLA_FLAGS += {args.xla_flags}", flush=True)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags))
    child = [sys.executable, __file__, "--out", str(out / "flags"), "--length", str(args.length),
             "--models", args.models, "--steps", str(args.steps), "--n-layers", str(args.n_layers),
             "--prefill-length", str(args.prefill_length)]
    return subprocess.run(child, env=env, check=False).returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
