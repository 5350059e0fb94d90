"""Benchmark the linear-time mixers' kernels: SSD (Mamba-2) and the element-wise linear scan.

SSD shapes (bf16 x/B/C, fp32 Δ, one B/C group, H = 16, P = N = 128): B=1, T=16384 (the shape of
the goal "≤ 1.0x fla chunk_simple_gla, 0.315 ms") and B=4, T=4096. Forms timed:
  memx `pallas_gpu` and `xla` (chunked, custom VJP), `lax_scan` (the reference recurrence, a
  `lax.scan` over tokens) and `assoc_scan` (`lax.associative_scan` over materialised
  [B, T, H, P, N] states, what direct JAX ports do). A form whose compiled memory exceeds the
  device's is reported as skipped with the bytes it would need. `fla`: flash-linear-attention's
  `chunk_simple_gla` on the same problems in the same run (GPU, PyTorch + fla-core installed:
  `scripts/fetch_gpu_wheels.sh` here, then carry `.gpu_wheels`; `gpu_check.sh` installs it).
Linear-scan shapes (fp32): B=4, T=4096 with D = 1536 (Mamba-1 d_inner; the "~0.1 ms memory
floor" of the goal) and D = 1536·16 (the same with the N = 16 state flattened into channels).
Forms: memx `pallas_gpu`, `xla`, `lax_scan` (reference) and `assoc_scan`.
Short-conv shapes (Mamba-2's causal depthwise conv, W = 4, SiLU fused, bf16): B=1, T=65536,
C=1024 (each of the 64k distillation student's three convs: x, B and C) and B=4, T=4096,
C=2048. Forms: memx `pallas_gpu` (tiled kernels; two-pass backward by default, the fused one
in the sweep) and `xla` (shifted slices that XLA fuses, autodiff backward), against the floor
of reading x and writing y once (the forward) plus reading x and dy and writing dx once (the
backward).

Per (form, shape, pass) the script reports the median wall time of compiled calls (after
warm-up, each ended by block_until_ready), the compiled temporary bytes, and a roofline: SSD
TFLOP/s on the chunked algorithm's FLOPs (2·Q·(N+P) + 4·P·N per token and head at Q = 64;
backward counted as 2x forward) and both scans' GB/s against the memory floor (each input read
once, each output written once) at the bandwidth of a device copy measured in the same run.

  python scripts/bench_ssm.py --out $OUT/bench_ssm              # GPU: full run (< 3 minutes)
  python scripts/bench_ssm.py --out /tmp/bs --quick             # CPU run, small shapes (~1 min)
  python scripts/bench_ssm.py --out $OUT/bs --sweep             # + pallas chunk / tile sweep
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from memx._device import memory_limit
from memx.kernels import linear_scan as ls
from memx.kernels import short_conv as sc
from memx.kernels import ssd as ssd_ops
from memx.kernels.ssd import api as ssd_api
from memx.timing import per_call_device_time, profile_kernel_times

FLA_CHUNK_SIMPLE_GLA_MS = 0.315     # fla chunk_simple_gla fwd, B=1, T=16k, H=16, D=128, H100


@dataclasses.dataclass(frozen=True)
class SsdShape:
  b: int
  t: int
  h: int = 16
  p: int = 128
  g: int = 1
  n: int = 128
  dtype: str = "bfloat16"

  @property
  def name(self) -> str:
    return f"ssd {self.b}x{self.t} H{self.h} P{self.p} N{self.n}"


@dataclasses.dataclass(frozen=True)
class ScanShape:
  b: int
  t: int
  d: int
  dtype: str = "float32"

  @property
  def name(self) -> str:
    return f"scan {self.b}x{self.t}x{self.d}"


@dataclasses.dataclass(frozen=True)
class ConvShape:
  b: int
  t: int
  c: int
  w: int = 4
  dtype: str = "bfloat16"

  @property
  def name(self) -> str:
    return f"conv {self.b}x{self.t}x{self.c} W{self.w}"


# --- problems -----------------------------------------------------------------------------------


def ssd_inputs(s: SsdShape, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 6)
  dt_ = jnp.dtype(s.dtype)
  x = jax.random.normal(ks[0], (s.b, s.t, s.h, s.p), dt_)
  dt = jax.nn.softplus(jax.random.normal(ks[1], (s.b, s.t, s.h)) - 2.0)
  a = -jnp.exp(jax.random.uniform(ks[2], (s.h,), minval=0.0, maxval=2.7))
  bm = jax.random.normal(ks[3], (s.b, s.t, s.g, s.n), dt_) * s.n ** -0.5
  cm = jax.random.normal(ks[4], (s.b, s.t, s.g, s.n), dt_) * s.n ** -0.5
  dy = jax.random.normal(ks[5], x.shape, dt_)
  return (x, dt, a, bm.astype(dt_), cm.astype(dt_)), dy


def ssd_form(name: str, blocks=None):
  """y = f(x, dt, A, B, C) for one form."""
  if name in ("pallas_gpu", "xla"):
    return lambda x, dt, a, b, c: ssd_ops.ssd(x, dt, a, b, c, implementation=name,
                                              block_sizes=blocks)[0]
  if name == "lax_scan":
    return lambda x, dt, a, b, c: ssd_ops.ssd_reference(x, dt, a, b, c)[0]
  if name == "assoc_scan":
    return lambda x, dt, a, b, c: ssd_ops.associative_scan_states(
        x, dt, dt * a[None, None, :], b, c)
  raise ValueError(name)


def ssd_flops(s: SsdShape, q: int = 64) -> float:
  """FLOPs of the chunked SSD forward at chunk q (intra-chunk C Bᵀ and its product with x,
  chunk states and their read-out)."""
  return float(s.b * s.t * s.h * (2 * q * (s.n + s.p) + 4 * s.p * s.n))


def ssd_rates(row: dict, s: SsdShape, chunk: int, bandwidth: float) -> None:
  """TFLOP/s, GB/s and x floor of a timed SSD row, all from one time: the device time where
  measured (no dispatch), else the wall time."""
  ms = row.get("device_ms") or row.get("time_ms")
  if not ms:
    return
  factor = 1.0 if row["pass_"] == "fwd" else 3.0
  row["tflops"] = factor * ssd_flops(s, chunk) / (ms * 1e-3) / 1e12
  row["gbs"] = factor * ssd_bytes(s) / (ms * 1e-3) / 1e9
  row["vs_floor"] = ms * 1e-3 / (factor * ssd_bytes(s) / bandwidth)


def ssd_bytes(s: SsdShape) -> float:
  item = jnp.dtype(s.dtype).itemsize
  return float(item * s.b * s.t * (2 * s.h * s.p + 2 * s.g * s.n) + 4 * s.b * s.t * s.h)


def scan_inputs(s: ScanShape, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  dt_ = jnp.dtype(s.dtype)
  a = jax.nn.sigmoid(jax.random.normal(ks[0], (s.b, s.t, s.d)) + 2.0).astype(dt_)
  x = jax.random.normal(ks[1], (s.b, s.t, s.d), dt_)
  dh = jax.random.normal(ks[2], (s.b, s.t, s.d), dt_)
  return (a, x), dh


def scan_form(name: str, blocks=None):
  if name in ("pallas_gpu", "xla"):
    return lambda a, b: ls.linear_scan(a, b, implementation=name, block_sizes=blocks)[0]
  if name == "lax_scan":
    return lambda a, b: ls.linear_scan_reference(a, b)[0]
  if name == "assoc_scan":
    return lambda a, b: ls.linear_scan_associative(a, b)[0]
  raise ValueError(name)


def scan_bytes(s: ScanShape) -> float:
  return float(3 * s.b * s.t * s.d * jnp.dtype(s.dtype).itemsize)


def conv_inputs(s: ConvShape, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 4)
  dt_ = jnp.dtype(s.dtype)
  x = jax.random.normal(ks[0], (s.b, s.t, s.c), dt_)
  w = (0.5 * jax.random.normal(ks[1], (s.w, s.c))).astype(dt_)
  bias = (0.1 * jax.random.normal(ks[2], (s.c,))).astype(dt_)
  dy = jax.random.normal(ks[3], (s.b, s.t, s.c), dt_)
  return (x, w, bias), dy


def conv_form(name: str, blocks=None):
  return lambda x, w, bias: sc.causal_conv(x, w, bias, activation="silu", implementation=name,
                                           block_sizes=blocks)


def conv_bytes(s: ConvShape) -> float:
  """The forward's floor: x read and y written once."""
  return float(2 * s.b * s.t * s.c * jnp.dtype(s.dtype).itemsize)


# --- measurement --------------------------------------------------------------------------------


def _time(fn, args, reps: int, budget_s: float) -> float:
  jax.block_until_ready(fn(*args))      # warm-up: first-call costs stay out of the numbers
  times, start = [], time.perf_counter()
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > budget_s and len(times) >= 3:
      break
  return statistics.median(times)


def fla_rows(s: SsdShape) -> list[dict]:
  """flash-linear-attention's chunk_simple_gla on the same problem in the same run (PyTorch +
  fla where installed; `gpu_check.sh` installs a carried fla-core wheel): q = C, k = B, v = x,
  g = Δ·A per token and head. Forward time by triton.testing.do_bench (CUDA events, L2 flushed
  between calls): a device time, as `device_ms`. Its backward is timed too where it runs."""
  row = dict(form="fla chunk_simple_gla", kind="ssd", shape=s.name)
  try:
    import torch  # noqa: PLC0415 - optional peer, GPU machine only
    import triton.testing  # noqa: PLC0415
    from fla.ops.simple_gla import chunk_simple_gla  # noqa: PLC0415
  except ImportError as e:
    return [row | dict(pass_="fwd", status="skipped", reason=f"fla not installed ({e.name})")]
  if not torch.cuda.is_available():
    return [row | dict(pass_="fwd", status="skipped", reason="no CUDA device for PyTorch")]
  gen = torch.Generator(device="cuda").manual_seed(0)
  dt_ = getattr(torch, s.dtype)
  shape = (s.b, s.t, s.h)
  q, k = (torch.randn(*shape, s.n, device="cuda", dtype=dt_, generator=gen) * s.n ** -0.5
          for _ in range(2))
  v = torch.randn(*shape, s.p, device="cuda", dtype=dt_, generator=gen)
  g = -torch.rand(*shape, device="cuda", dtype=torch.float32, generator=gen) * 0.1
  rows = []
  fwd = lambda: chunk_simple_gla(q, k, v, g=g, scale=1.0, output_final_state=True)  # noqa: E731
  try:
    ms = triton.testing.do_bench(fwd)
    # do_bench's CUDA-event time (L2 flushed): a device time, never set beside a wall time.
    rows.append(row | dict(pass_="fwd", status="ok", device_ms=ms))
  except Exception as e:  # noqa: BLE001 - a peer that fails here is a result too
    return [row | dict(pass_="fwd", status="error", reason=f"{type(e).__name__}: {e}"[:300])]
  qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
  do = torch.randn_like(v)

  def fwd_bwd():
    o, _ = chunk_simple_gla(qg, kg, vg, g=g, scale=1.0, output_final_state=True)
    o.backward(do)
  try:
    ms = triton.testing.do_bench(fwd_bwd)
    rows.append(row | dict(pass_="fwd+bwd", status="ok", device_ms=ms))
  except Exception as e:  # noqa: BLE001 - fla's backward refuses Hopper on older Triton
    rows.append(row | dict(pass_="fwd+bwd", status="error",
                           reason=f"{type(e).__name__}: {e}"[:300]))
  return rows


def copy_bandwidth(on_gpu: bool) -> float:
  """Bytes/s of a device copy (read + write) of 1 GiB (64 MiB on CPU): the memory ceiling."""
  n = (1 << 28) if on_gpu else (1 << 24)
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  return 2 * x.size * 4 / _time(f, (x,), 10, 5.0)


def device_time_ms(fn, inputs, reps: int, budget_s: float, wall_ms: float | None = None,
                   copies: int = 4) -> float:
  """Forward device time per call (ms), free of host dispatch (memx.timing.per_call_device_time):
  2k calls chained in one program over 2 x `copies` distinct copies of the inputs (repeated as
  needed), k large enough that k calls last about a millisecond by the wall time `wall_ms` of
  one call (an upper bound of its device time), so host jitter divided by k stays small."""
  calls = max(copies, -(-1.0 // wall_ms) if wall_ms else copies)
  calls = copies * -(-int(calls) // copies)  # a multiple of the distinct copies
  distinct = [tuple(jnp.array(v, copy=True) for v in inputs) for _ in range(2 * copies)]
  sets = distinct * (calls // copies)
  return per_call_device_time(fn, sets, reps, budget_s) * 1e3


def measure(form_name, fn, inputs, cot, *, reps, budget_s, mem_limit, deadline,
            device_time: bool = False, profile: bool = False):
  """Rows for the fwd and fwd+bwd passes of one form on one problem (device_time: the fwd row
  also gets `device_ms`, the per-call device time, the number to hold against a peer's;
  profile: both rows get `kernels_us`, device µs per call by kernel, from a profiler trace)."""
  rows = []
  if time.perf_counter() > deadline:
    return [dict(form=form_name, pass_=p, status="skipped", reason="total time budget")
            for p in ("fwd", "fwd+bwd")]

  def fwd_bwd(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot)

  for pass_name, f in (("fwd", fn), ("fwd+bwd", fwd_bwd)):
    row = dict(form=form_name, pass_=pass_name)
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(f).lower(*inputs).compile()
      row["compile_s"] = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      row["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
      if mem_limit is not None and row["temp_bytes"] and row["temp_bytes"] > 0.9 * mem_limit:
        row.update(status="skipped", reason=f"needs {row['temp_bytes'] / 2**30:.1f} GiB of "
                                            f"temporaries")
      else:
        row.update(status="ok", time_ms=_time(compiled, inputs, reps, budget_s) * 1e3)
        if device_time and pass_name == "fwd":
          row["device_ms"] = device_time_ms(f, inputs, reps, budget_s, row["time_ms"])
        if profile:
          kernels = profile_kernel_times(compiled, inputs)
          row["kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
    except Exception as e:  # noqa: BLE001 - record the failure and go on to the next form
      row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
      traceback.print_exc(file=sys.stderr)
    rows.append(row)
  return rows


# --- report -------------------------------------------------------------------------------------


def _env(bandwidth):
  dev = jax.devices()[0]
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
  except OSError:
    sha = ""
  return dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              commit=sha, jax=jax.__version__, device=dev.device_kind, platform=dev.platform,
              copy_bandwidth_gbs=bandwidth / 1e9)


def goals(records):
  """The issue's goals, evaluated where the run has the numbers (GPU runs)."""
  out = []

  def t(kind, shape, form, pass_="fwd"):
    for r in records:
      if (r["kind"], r["shape"], r["form"], r["pass_"], r["status"]) == (kind, shape, form,
                                                                         pass_, "ok"):
        return r
    return None

  big = SsdShape(1, 16384).name
  # fla's chunk_simple_gla takes per-head q and k: the same problem is memx's SSD with one B/C
  # group per head ("pallas_gpu g=H"); the g = 1 row does 1/16 of that B/C work and is used
  # only when the g = H row is missing, and says so.
  same = t("ssd", big, "pallas_gpu g=H")
  pg = same or t("ssd", big, "pallas_gpu")
  if pg:
    # fla's time is a device time (CUDA events, a mean: triton.testing.do_bench): ours is held
    # against it the same way when measured, else the wall time (an upper bound). fla timed in
    # this run, else the anchor.
    ms = pg.get("device_ms") or pg["time_ms"]
    fla = t("ssd", big, "fla chunk_simple_gla")
    base, where = ((fla["device_ms"], "this run") if fla
                   else (FLA_CHUNK_SIMPLE_GLA_MS, "anchors"))
    groups = "memx at g = H, as fla" if same else "memx at g = 1: less B/C work than fla"
    out.append(dict(goal=f"SSD fwd <= 1.0x fla chunk_simple_gla ({base:.3f} ms, {where}; "
                         f"{groups})", value=ms / base, target=1.0, met=ms <= base))
  scan = ScanShape(4, 4096, 1536).name
  ps, assoc = t("scan", scan, "pallas_gpu"), t("scan", scan, "assoc_scan")
  if ps:
    if assoc:
      both = ps.get("device_ms") and assoc.get("device_ms")
      mine = ps["device_ms"] if both else ps["time_ms"]
      base = assoc["device_ms"] if both else assoc["time_ms"]
      out.append(dict(goal="linear_scan >= 5x faster than associative_scan", value=base / mine,
                      target=5.0, met=base / mine >= 5.0))
    else:  # never against a number from elsewhere: a baseline is measured in the same run
      out.append(dict(goal="linear_scan >= 5x faster than associative_scan (associative_scan "
                           "not measured in this run)", value=None, target=5.0, met=None))
    basis = "device time" if ps.get("device_ms") else "wall time"
    out.append(dict(goal=f"linear_scan within 3x of the memory floor ({basis})",
                    value=ps["vs_floor"], target=3.0, met=ps["vs_floor"] <= 3.0))
  return out


def write_report(out_dir: pathlib.Path, env, records):
  out_dir.mkdir(parents=True, exist_ok=True)
  result = dict(env=env, records=records, goals=goals(records))
  tmp = out_dir / "results.json.tmp"
  tmp.write_text(json.dumps(result, indent=1))
  tmp.rename(out_dir / "results.json")
  lines = [f"# bench_ssm — {env['device']} ({env['platform']}), jax {env['jax']}, "
           f"{env['date']}, commit {env['commit']}", "",
           f"Device copy bandwidth (same run): {env['copy_bandwidth_gbs']:.1f} GB/s", "",
           "Time ms: host wall time per call. Device ms: per-call device time of the forward "
           "(memx.timing.per_call_device_time: calls chained in one program, each on its own "
           "input copies), where measured; fla's rows are triton's do_bench device times. "
           "TFLOP/s, GB/s and x floor use the device time where there is one, else the wall "
           "time.", "",
           "| problem | form | pass | time ms | device ms | TFLOP/s | GB/s | x floor | temp MiB "
           "| status |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
  fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
  for r in records:
    temp = r.get("temp_bytes")
    lines.append(
        f"| {r['shape']} | {r['form']} | {r['pass_']} | {fmt(r.get('time_ms'), '.4g')} | "
        f"{fmt(r.get('device_ms'), '.4g')} | "
        f"{fmt(r.get('tflops'), '.3g')} | {fmt(r.get('gbs'), '.4g')} | "
        f"{fmt(r.get('vs_floor'), '.3g')} | {fmt(None if temp is None else temp / 2**20, '.1f')}"
        f" | {r['status']}{' — ' + r['reason'] if r.get('reason') else ''} |")
  profiled = [r for r in records if r.get("kernels_us")]
  if profiled:
    lines += ["", "Device µs per call by kernel (profiler trace, top 8):", ""]
    lines += [f"- {r['shape']} {r['form']} {r['pass_']}: " + ", ".join(
        f"{k[:48]} {v:.1f}" for k, v in r["kernels_us"].items()) for r in profiled]
  if result["goals"]:
    lines += ["", "| goal | value | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {g['goal']} | {'–' if g['value'] is None else format(g['value'], '.3g')} "
              f"| {g['target']} | {'–' if g['met'] is None else g['met']} |"
              for g in result["goals"]]
  tmp = out_dir / "results.md.tmp"
  tmp.write_text("\n".join(lines) + "\n")
  tmp.rename(out_dir / "results.md")
  return lines


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output directory (results.json, results.md)")
  ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (the unit test's run)")
  ap.add_argument("--forms", default="pallas_gpu,xla,lax_scan,assoc_scan,fla",
                  help="comma-separated forms to time (fla: flash-linear-attention's "
                       "chunk_simple_gla on the SSD problems, GPU, where installed)")
  ap.add_argument("--sweep", action="store_true", help="also time pallas_gpu chunk/tile options")
  ap.add_argument("--sweep-names", default=None,
                  help="--sweep: only these options (names after 'pallas_gpu ', comma-separated)")
  ap.add_argument("--kinds", default="ssd,scan,conv",
                  help="which problems: any of ssd, scan, conv (comma-separated)")
  ap.add_argument("--profile", action="store_true",
                  help="goal rows: also device time by kernel (profiler trace)")
  ap.add_argument("--ssd-shapes", default=None,
                  help="only these SSD problems, as BxT (e.g. 1x16384,1x65536)")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--budget-s", type=float, default=1.5, help="timing budget per measurement")
  ap.add_argument("--total-budget-s", type=float, default=140.0,
                  help="stop starting new measurements after this long (gpu_check allows 170)")
  args = ap.parse_args(argv)
  unknown = set(args.kinds.split(",")) - {"ssd", "scan", "conv"}
  if unknown:
    ap.error(f"--kinds: unknown {sorted(unknown)}; expected any of ssd, scan, conv")
  on_gpu = ssd_api.gpu_backend()
  if args.tiny:
    ssd_shapes = [SsdShape(1, 64, h=2, p=16, n=16, dtype="float32")]
    scan_shapes = [ScanShape(2, 64, 32)]
    conv_shapes = [ConvShape(1, 64, 32, dtype="float32")]
  elif args.quick:
    ssd_shapes = [SsdShape(1, 1024, h=4, p=32, n=32, dtype="float32"),
                  SsdShape(2, 512, h=4, p=32, n=32, dtype="float32")]
    scan_shapes = [ScanShape(4, 4096, 256)]
    conv_shapes = [ConvShape(2, 4096, 256, dtype="float32")]
  else:
    ssd_shapes = [SsdShape(1, 16384), SsdShape(4, 4096)]
    scan_shapes = [ScanShape(4, 4096, 1536), ScanShape(4, 4096, 1536 * 16)]
    conv_shapes = [ConvShape(1, 65536, 1024), ConvShape(4, 4096, 2048)]
  wanted = args.forms.split(",")
  forms = [f for f in ("pallas_gpu", "xla", "lax_scan", "assoc_scan")
           if f in wanted and (f != "pallas_gpu" or on_gpu)]
  deadline = time.perf_counter() + args.total_budget_s
  bandwidth = copy_bandwidth(on_gpu)
  env = _env(bandwidth)
  mem_limit = memory_limit()
  out_dir = pathlib.Path(args.out)
  records = []
  if not on_gpu:
    records.append(dict(kind="-", shape="all", form="pallas_gpu", pass_="-", status="skipped",
                        reason="no NVIDIA GPU (the Pallas kernels run only in the interpreter)"))
  sweep = {}
  if args.sweep and on_gpu:
    # Both state passes next to the default ("auto": sequential at >= 128 walking programs,
    # else parallel), then tiles, most informative first (a time budget cuts the tail).
    sweep = {"pallas_gpu sequential": ssd_ops.BlockSizes(state_pass="sequential"),
             "pallas_gpu parallel": ssd_ops.BlockSizes(state_pass="parallel"),
             "pallas_gpu parallel bf16S": ssd_ops.BlockSizes(state_pass="parallel",
                                                             chunk_states_fp32=False),
             # The sequential walk's prefetch depth, narrower walk tiles (256 programs), and
             # one output program per chunk and head (C Bᵀ computed once): what fla's autotune
             # space covers and memx's defaults do not (read from fla-core 0.6.0).
             "pallas_gpu seq s3": ssd_ops.BlockSizes(state_pass="sequential", num_stages=3),
             "pallas_gpu seq s4": ssd_ops.BlockSizes(state_pass="sequential", num_stages=4),
             "pallas_gpu seq bn16": ssd_ops.BlockSizes(state_pass="sequential", block_n=16),
             "pallas_gpu seq bp128 bn16 w8": ssd_ops.BlockSizes(
                 state_pass="sequential", block_p=128, block_n=16, num_warps=8),
             # The chunk backward without register spills (ptxas: 372 B at block_p 64).
             "pallas_gpu bwd bp16": ssd_ops.BlockSizes(block_p_bwd=16),
             "pallas_gpu q128": ssd_ops.BlockSizes(chunk=128),
             # Q = 128 at 4 warps: 255 registers and a spill in the output kernel (ptxas); the
             # default takes 8 warps there.
             "pallas_gpu q128 w4": ssd_ops.BlockSizes(chunk=128, num_warps=4),
             "pallas_gpu bp32": ssd_ops.BlockSizes(block_p=32),
             # The boundary scan walks rows now (session 10: ~6 SASS instructions per element
             # and chunk, not ~54): narrower slices give more programs (256 at the student).
             "pallas_gpu scan128 r32": ssd_ops.BlockSizes(block_scan=128, scan_rows=32),
             "pallas_gpu scan64": ssd_ops.BlockSizes(block_scan=64),
             "pallas_gpu scan512": ssd_ops.BlockSizes(block_scan=512),
             "pallas_gpu scan1024 r8": ssd_ops.BlockSizes(block_scan=1024, scan_rows=8),
             "pallas_gpu scan256 r32": ssd_ops.BlockSizes(scan_rows=32)}
    # The distillation student's SSD layer at 64k (d 1024: H16 P64 N64, chunk 128): its
    # sequential state pass took 4.0 of the student's 20 ms prefill on an H100 with 32
    # programs (session 7). Only the Pallas tiles are timed there.
    ssd_shapes = [*ssd_shapes, SsdShape(1, 65536, h=16, p=64, n=64)]
    if args.sweep_names:
      keep = {f"pallas_gpu {n}" for n in args.sweep_names.split(",")}
      sweep = {k: v for k, v in sweep.items() if k in keep}
  kinds = args.kinds.split(",")
  if args.ssd_shapes:
    ssd_shapes = [sh for sh in ssd_shapes
                  if f"{sh.b}x{sh.t}" in args.ssd_shapes.split(",")]

  def run_ssd():
    for s in ssd_shapes:
      if "fla" in wanted and on_gpu and s.t <= 16384:
        for row in fla_rows(s):
          records.append(row)
          print(row, flush=True)
      inputs, cot = ssd_inputs(s)
      student = s.t == 65536
      # The student runs its SSD at chunk 128 (bench_distill --chunk): time it so.
      main = ssd_ops.BlockSizes(chunk=128) if student else None
      default_chunk = (main or ssd_ops.BlockSizes()).chunk
      candidates = [(f, ssd_form(f, main), default_chunk) for f in forms
                    if not student or f == "pallas_gpu"]
      # At the student shape every candidate runs the student's chunk of 128, so the sweep
      # compares tiles and state passes, not chunk sizes.
      candidates += [(name, ssd_form("pallas_gpu", dataclasses.replace(blocks, chunk=128)
                                     if student else blocks), 128 if student else blocks.chunk)
                     for name, blocks in sweep.items() if not student or blocks.block_p <= s.p]
      if "fla" in wanted and on_gpu and s == SsdShape(1, 16384):
        # The problem fla solves: one B/C group per head (its q and k are per head).
        per_head = dataclasses.replace(s, g=s.h)
        for row in measure("pallas_gpu g=H", ssd_form("pallas_gpu", None),
                           *ssd_inputs(per_head), reps=args.repeats, budget_s=args.budget_s,
                           mem_limit=mem_limit, deadline=deadline, device_time=True,
                           profile=False):
          row.update(kind="ssd", shape=s.name)
          ssd_rates(row, per_head, default_chunk, bandwidth)
          records.append(row)
          print(row, flush=True)
      for name, fn, chunk in candidates:
        main_forms = name in ("pallas_gpu", "pallas_gpu sequential")
        goal = s == SsdShape(1, 16384) and main_forms
        for row in measure(name, fn, inputs, cot, reps=args.repeats, budget_s=args.budget_s,
                           mem_limit=mem_limit, deadline=deadline, device_time=goal and on_gpu,
                           profile=main_forms and args.profile):
          row.update(kind="ssd", shape=s.name)
          ssd_rates(row, s, chunk, bandwidth)
          records.append(row)
          print(row, flush=True)
        write_report(out_dir, env, records)

  def run_scan():
    scan_sweep = {}
    if args.sweep and on_gpu:
      scan_sweep = {f"pallas_gpu c{c} bd{bd} w{w}": ls.BlockSizes(chunk=c, block_d=bd, num_warps=w)
                    for c, bd, w in ((64, 128, 1), (128, 512, 4), (32, 256, 2))}
    for s in scan_shapes:
      inputs, cot = scan_inputs(s)
      candidates = [(f, scan_form(f)) for f in forms]
      candidates += [(name, scan_form("pallas_gpu", b)) for name, b in scan_sweep.items()]
      for name, fn in candidates:
        goal = s == ScanShape(4, 4096, 1536) and name in ("pallas_gpu", "assoc_scan")
        for row in measure(name, fn, inputs, cot, reps=args.repeats, budget_s=args.budget_s,
                           mem_limit=mem_limit, deadline=deadline, device_time=goal and on_gpu,
                           profile=goal and args.profile):
          row.update(kind="scan", shape=s.name)
          if row.get("time_ms"):
            # fwd: read a, b, write h (3 tensors); the backward adds read a, h, dh and write
            # da, db (5 more), so fwd+bwd moves at least 8/3 of the forward's bytes. Rate and
            # floor from one time: the device time where measured, else the wall time.
            moved = scan_bytes(s) * (1.0 if row["pass_"] == "fwd" else 8.0 / 3.0)
            ms = row.get("device_ms") or row["time_ms"]
            row["gbs"] = moved / (ms * 1e-3) / 1e9
            row["vs_floor"] = ms * 1e-3 / (moved / bandwidth)
          records.append(row)
          print(row, flush=True)
        write_report(out_dir, env, records)

  def run_conv():
    conv_sweep = {}
    if args.sweep and on_gpu:
      # Register-bound tiles (ptxas, sm_90a): the forward at 32 (default) and 16 or 64 elements
      # per thread; the backward's 16-row sub-tiles at 8 warps (default) or 8 rows on 4.
      conv_sweep = {"pallas_gpu t16w4": sc.BlockSizes(block_t=16),
                    "pallas_gpu t64w8 bwd t8w4": sc.BlockSizes(block_t=64, num_warps=8,
                                                                block_t_bwd=8, num_warps_bwd=4),
                    "pallas_gpu c256w8": sc.BlockSizes(block_c=256, num_warps=8),
                    # One backward kernel: 2 fewer passes, ~2.5x the instructions (ptxas).
                    "pallas_gpu bwd fused": sc.BlockSizes(backward="fused"),
                    "pallas_gpu bwd rows1024": sc.BlockSizes(rows_bwd=1024)}
    for s in conv_shapes:
      inputs, cot = conv_inputs(s)
      # xla is the baseline whatever --forms says: the conv has no other peer in this run.
      candidates = [(f, conv_form(f)) for f in ("pallas_gpu", "xla")
                    if f == "xla" or f in forms]
      candidates += [(name, conv_form("pallas_gpu", b)) for name, b in conv_sweep.items()]
      for name, fn in candidates:
        main_form = name in ("pallas_gpu", "xla")
        for row in measure(name, fn, inputs, cot, reps=args.repeats, budget_s=args.budget_s,
                           mem_limit=mem_limit, deadline=deadline,
                           device_time=main_form and on_gpu, profile=main_form and args.profile):
          row.update(kind="conv", shape=s.name)
          if row.get("time_ms"):
            # fwd+bwd: the forward's 2 passes plus the backward's 3 (x, dy read; dx written).
            moved = conv_bytes(s) * (1.0 if row["pass_"] == "fwd" else 2.5)
            ms = row.get("device_ms") or row["time_ms"]
            row["gbs"] = moved / (ms * 1e-3) / 1e9
            row["vs_floor"] = ms * 1e-3 / (moved / bandwidth)
          records.append(row)
          print(row, flush=True)
        write_report(out_dir, env, records)

  # In the order --kinds names them, so a time budget cuts the last kind.
  for kind in kinds:
    {"ssd": run_ssd, "scan": run_scan, "conv": run_conv}[kind]()
  lines = write_report(out_dir, env, records)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  sys.exit(main())
