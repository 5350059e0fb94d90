"""Benchmark attention: memx implementations and peers, forward and forward+backward, one run.

For each shape (B·S = 16k tokens at S = 4096 and S = 16384, H = 16, D = 128, bf16) and mask
(causal; causal window 1024; MoA-like per-head windows at 25% density; packed segments), times
forward and forward+backward (median of timed calls after warm-up, each ended by
block_until_ready), reports TFLOP/s counted on visited (query, key) pairs only (fwd 4·D FLOPs
per pair, fwd+bwd 3.5x that, the FlashAttention convention) and the compiled temporary bytes.

Implementations: memx `dispatch` (implementation=None), `pallas_gpu`, `cudnn`, `xla`,
`reference`; peers `jax_cudnn` (jax.nn.dot_product_attention(implementation="cudnn")),
`jax_pallas` / `jax_pallas_tuned` (jax.experimental.pallas.ops.gpu.attention.mha with its
default tiles / the tuned tiles of research/anchors_attention.md §2.1), `tokamax_<impl>` where
tokamax is installed. Each config is compiled ahead of time once; results are written after
every config, so a timeout still leaves a table.

MoA density convention: MoA (Fu et al. 2024) measures density against the causal mask, so the
`moa` mask visits 25% of the causal pairs (12.5% of T·S at S = T); the JSON records both.

  python scripts/bench_attention.py --out $OUT/bench_attention              # GPU: full run
  python scripts/bench_attention.py --out /tmp/ba --quick                   # CPU smoke test
  python scripts/bench_attention.py --out $OUT/ba --sweep                   # + pallas tile sweep
"""

import argparse
import dataclasses
import datetime
import functools
import pathlib
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from memx._io import atomic_file, write_json
from memx.kernels.attention import CAUSAL, BlockSizes, Mask, attention, moa_windows
from memx.kernels.attention import api as attention_api
from memx.timing import profile_kernel_times


@dataclasses.dataclass(frozen=True)
class Shape:
  b: int
  s: int
  h: int
  d: int
  dtype: str

  @property
  def name(self) -> str:
    return f"{self.b}x{self.s}"


@dataclasses.dataclass(frozen=True)
class Problem:
  """One (shape, mask) pair: the memx Mask, segment ids and the exact visited-pair count."""

  shape: Shape
  mask_name: str
  mask: Mask
  segments: tuple[int, ...] | None  # document lengths per batch row (packed case)

  @functools.cached_property
  def visited_pairs(self) -> int:
    sh = self.shape
    if self.segments is not None:
      per_head = sum(n * (n + 1) // 2 for n in self.segments)  # causal inside each document
      return per_head * sh.h * sh.b
    pairs = self.mask.visited_pairs(sh.s, sh.s)
    heads = sh.h if pairs.shape[0] == 1 else 1
    return int(pairs.sum()) * heads * sh.b

  @property
  def density(self) -> float:
    sh = self.shape
    return self.visited_pairs / (sh.b * sh.h * sh.s * sh.s)

  def segment_ids(self):
    if self.segments is None:
      return None
    ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(self.segments)])
    return jnp.asarray(np.broadcast_to(ids, (self.shape.b, self.shape.s)))


def make_problems(shapes, mask_names, *, window: int, moa_density: float, n_sink: int):
  problems = []
  for sh in shapes:
    causal_density = CAUSAL.density(sh.s, sh.s)
    for name in mask_names:
      segments = None
      if name == "causal":
        mask = CAUSAL
      elif name == "window":
        mask = Mask(window_left=window)
      elif name == "moa":
        mask = moa_windows(sh.h, sh.s, moa_density * causal_density, n_sink=n_sink)
      elif name == "packed":
        # Four documents of uneven length (40/30/20/10%) per row: a typical packed batch.
        fracs = (0.4, 0.3, 0.2)
        lengths = [int(sh.s * f) for f in fracs]
        segments = (*lengths, sh.s - sum(lengths))
        mask = CAUSAL
      else:
        raise ValueError(f"unknown mask {name!r}")
      problems.append(Problem(sh, name, mask, segments))
  return problems


# --- implementations -------------------------------------------------------------------------


def _memx(impl, **kw):
  def fn(p: Problem):
    seg = p.segment_ids()
    return lambda q, k, v: attention(q, k, v, mask=p.mask, segment_ids=seg,
                                     implementation=impl, **kw)
  return fn


def _jax_cudnn(p: Problem):
  m = p.mask
  if p.segments is not None or m.num_heads is not None or m.n_sink:
    return None
  window = None if m.window_left is None else (m.window_left, 0)
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=m.causal, local_window_size=window, implementation="cudnn")


def _stock_pallas(tuned: bool, interpret: bool):
  def fn(p: Problem):
    m = p.mask
    if m.window_left is not None or m.num_heads is not None or m.n_sink:
      return None  # stock mha: causal and segment ids only
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.pallas.ops.gpu import attention as stock
    blocks = stock.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=128,
                              block_q_dq=128, block_kv_dq=64) if tuned else \
        stock.BlockSizes.get_default()
    seg = p.segment_ids()
    scale = p.shape.d ** -0.5
    return lambda q, k, v: stock.mha(q, k, v, seg, sm_scale=scale, causal=m.causal,
                                     block_sizes=blocks, num_warps=8 if tuned else None,
                                     interpret=interpret)
  return fn


def _tokamax(impl):
  def fn(p: Problem):
    import tokamax  # noqa: PLC0415 - optional peer
    m = p.mask
    if p.segments is not None or m.num_heads is not None or m.n_sink:
      return None
    window = None if m.window_left is None else (m.window_left, 0)
    return lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=m.causal, local_window_size=window, implementation=impl)
  return fn


def implementations(names, on_gpu: bool, sweep: bool):
  table = {
      "dispatch": _memx(None),
      "pallas_gpu": _memx("pallas_gpu", interpret=not on_gpu),
      "cudnn": _memx("cudnn"),
      "xla": _memx("xla"),
      "reference": _memx("reference"),
      "jax_cudnn": _jax_cudnn,
      "jax_pallas": _stock_pallas(tuned=False, interpret=not on_gpu),
      "jax_pallas_tuned": _stock_pallas(tuned=True, interpret=not on_gpu),
      "tokamax_mosaic": _tokamax("mosaic"),
      "tokamax_triton": _tokamax("triton"),
  }
  unknown = [n for n in names if n not in table]
  if unknown:
    raise SystemExit(f"unknown implementations {unknown}; choose from {sorted(table)}")
  chosen = {n: table[n] for n in names}
  if sweep:
    for tag, changes in SWEEP.items():
      chosen[f"pallas_gpu[{tag}]"] = _memx_tiles(changes, interpret=not on_gpu)
  return chosen


def _memx_tiles(changes: dict, **kw):
  """memx's Pallas kernels at the problem's default tiles (`BlockSizes.get_default` for its
  dtype and head dim) with `changes` applied: a candidate differs from the default only in
  what its name says."""
  def fn(p: Problem):
    d_pad = max(16, 1 << (p.shape.d - 1).bit_length())
    default = BlockSizes.get_default("pallas_gpu", itemsize=jnp.dtype(p.shape.dtype).itemsize,
                                     head_dim=d_pad)
    return _memx("pallas_gpu", block_sizes=dataclasses.replace(default, **changes), **kw)(p)
  return fn


# Tile candidates for --sweep, each a change to the problem's default tiles (for bf16 at head
# dim 128: fwd 128 x 128, dK/dV 64 x 128, dQ 128 x 64, 8 warps, stages 3/2), "default" the
# control. Sessions 7 and 9 built their candidates on BlockSizes() (fwd 128 x 64), so each also
# changed the forward tile; their "the defaults stay" verdicts are re-measured here.
# Session 7 (H100) timed thin dK/dV and dQ tiles (32 rows), 4-warp backward variants, deeper
# pipelines and dQ by atomics. Compiled offline with ptxas for sm_90a (Triton 3.7.1, session 8),
# the default dK/dV tile (64 x 128, 8 warps) spills ~580 B of registers at head dim 128 and
# every 4-warp backward spills KBs; these keep dQ at its default and remove the dK/dV spill.
SWEEP = {
    "default": {},
    "kv64x64": {"block_k_dkv": 64},
    "kv64x64_s3": {"block_k_dkv": 64, "num_stages_bwd": 3},
    "kv32x128_s3": {"block_q_dkv": 32, "num_stages_bwd": 3},
    # Every exp as one inline ex2.approx.ftz.f32 (jnp.exp2's libdevice call may keep denormal
    # handling, depending on how XLA sets flush-to-zero), with the default and the spill-free
    # dK/dV tiles.
    "ftz": {"exp2_ftz": True},
    "kv64x64_ftz": {"block_k_dkv": 64, "exp2_ftz": True},
    # dQ by atomic adds in the dK/dV pass (BlockSizes.dq_atomic, 5 tile matmuls instead of 7)
    # is no candidate: on an H100 it took 25.7 ms fwd+bwd against 11.6 (1x16384 causal,
    # session 7), the fp32 atomics costing far more than the two matmuls they save.
}


# --- measurement -------------------------------------------------------------------------------


def _time(fn, args, reps: int, budget_s: float) -> float:
  """Median seconds per call after warm-up (each call synchronised)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times, start = [], time.perf_counter()
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > budget_s and len(times) >= 3:
      break
  return statistics.median(times)


def measure(impl_name, make, p: Problem, reps: int, budget_s: float, profile: bool = False):
  """fwd and fwd+bwd rows of one implementation on one problem (profile: each row also gets
  `kernels_us`, device µs per call by kernel from a profiler trace, top 6)."""
  sh = p.shape
  dtype = jnp.dtype(sh.dtype)
  f = make(p)
  if f is None:
    return [dict(status="unsupported")]
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(kk, (sh.b, sh.s, sh.h, sh.d), jnp.float32).astype(dtype)
                 for kk in ks)
  fwd = jax.jit(f)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(do)

  fwd_flops = 4 * sh.d * p.visited_pairs
  rows = []
  for pass_name, fn, args, flops in (("fwd", fwd, (q, k, v), fwd_flops),
                                     ("fwd+bwd", jax.jit(fwd_bwd), (q, k, v, do),
                                      3.5 * fwd_flops)):
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    seconds = _time(compiled, args, reps, budget_s)
    rows.append(dict(pass_=pass_name, status="ok", time_ms=seconds * 1e3,
                     tflops=flops / seconds / 1e12, temp_bytes=int(mem.temp_size_in_bytes),
                     compile_s=compile_s))
    if profile:
      kernels = profile_kernel_times(compiled, args)
      rows[-1]["kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:6])
  return rows


def dispatch_choice(p: Problem) -> str:
  """Which implementation implementation=None picks for this problem (first usable)."""
  sh = p.shape
  q = jax.ShapeDtypeStruct((sh.b, sh.s, sh.h, sh.d), jnp.dtype(sh.dtype))
  seg = None if p.segments is None else "packed"
  for name in attention_api.default_order():
    if attention_api.unsupported_reason(name, q, q, p.mask, seg, False) is None:
      return name
  return "none"


# --- report ------------------------------------------------------------------------------------


def _env():
  dev = jax.devices()[0]
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
  except OSError:
    sha = ""
  return dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind,
              git=sha, argv=sys.argv[1:])


def goals(records):
  """The issue's H100 goals, evaluated where this run has the numbers (fwd+bwd)."""
  def t(impl, mask, shape):
    for r in records:
      if (r["impl"], r["mask"], r["shape"], r.get("pass")) == (impl, mask, shape, "fwd+bwd") \
          and r["status"] == "ok":
        return r
    return None

  out = []
  for shape in sorted({r["shape"] for r in records}):
    d, c = t("dispatch", "causal", shape), t("jax_cudnn", "causal", shape)
    if d and c:
      out.append((f"{shape} dense causal via dispatch >= 0.95x cuDNN",
                  c["time_ms"] / d["time_ms"], 0.95))
    pg = t("pallas_gpu", "causal", shape)
    stock = [x for x in (t("jax_pallas", "causal", shape), t("jax_pallas_tuned", "causal", shape))
             if x]
    if pg and stock:
      best = min(x["time_ms"] for x in stock)
      out.append((f"{shape} pallas_gpu causal >= 1.5x best JAX stock Pallas",
                  best / pg["time_ms"], 1.5))
    w = t("dispatch", "window", shape)
    if w and shape.endswith("x16384"):
      out.append((f"{shape} window 1024 (dispatch) fwd+bwd <= 1.36 ms [value: ms]",
                  w["time_ms"], 1.36))
    moa = t("dispatch", "moa", shape)
    if moa and c:
      out.append((f"{shape} MoA 25% <= 0.35x dense causal cuDNN [value: ratio]",
                  moa["time_ms"] / c["time_ms"], 0.35))
    pk = t("dispatch", "packed", shape)
    if pk and d:
      out.append((f"{shape} packed >= 0.9x dense causal TFLOP/s", pk["tflops"] / d["tflops"],
                  0.9))
  return out


def write_report(out_dir: pathlib.Path, env, records):
  out_dir.mkdir(parents=True, exist_ok=True)
  write_json(out_dir / "results.json", dict(env=env, records=records), indent=1)
  lines = [f"# bench_attention ({env['device']}, jax {env['jax']}, {env['date']}, "
           f"git {env['git'] or '?'})", "",
           "| shape | mask | density | impl (→ dispatched) | pass | ms | TFLOP/s | temp MiB "
           "| compile s | status |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    impl = r["impl"] + (f" → {r['dispatched']}" if r.get("dispatched") else "")
    if r["status"] == "ok":
      lines.append(f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {impl} | {r['pass']} "
                   f"| {r['time_ms']:.4g} | {r['tflops']:.4g} | "
                   f"{r['temp_bytes'] / 2**20:.1f} | {r['compile_s']:.1f} | ok |")
    else:
      lines.append(f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {impl} | | | | | | "
                   f"{r['status']}: {r.get('error', '')[:80]} |")
  profiled = [r for r in records if r.get("kernels_us")]
  if profiled:
    lines += ["", "Device µs per call by kernel (profiler trace, top 6):", ""]
    lines += [f"- {r['shape']} {r['mask']} {r['impl']} {r['pass']}: " + ", ".join(
        f"{k[:48]} {v:.0f}" for k, v in r["kernels_us"].items()) for r in profiled]
  g = goals(records)
  if g:
    lines += ["", "## Goals (fwd+bwd)", "", "| goal | value | target | met |", "|---|---|---|---|"]
    for name, value, target in g:
      met = value <= target if "<=" in name else value >= target
      lines.append(f"| {name} | {value:.3f} | {target} | {'yes' if met else 'NO'} |")
  with atomic_file(out_dir / "results.md") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="output directory (results.json, results.md)")
  ap.add_argument("--quick", action="store_true", help="tiny shapes (automatic on CPU)")
  ap.add_argument("--impls", default=None, help="comma-separated implementation names")
  ap.add_argument("--masks", default="causal,window,moa,packed")
  ap.add_argument("--seqs", default=None, help="comma-separated S values (B = tokens // S)")
  ap.add_argument("--tokens", type=int, default=None, help="B·S per shape")
  ap.add_argument("--heads", type=int, default=None)
  ap.add_argument("--head-dim", type=int, default=None)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--window", type=int, default=None)
  ap.add_argument("--moa-density", type=float, default=0.25,
                  help="MoA density, relative to the causal mask")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--budget-s", type=float, default=170.0,
                  help="stop starting new configs after this many seconds")
  ap.add_argument("--sweep", action="store_true", help="also time pallas_gpu tile candidates")
  ap.add_argument("--profile", action="store_true",
                  help="pallas_gpu and jax_cudnn rows: also device time by kernel (trace)")
  ap.add_argument("--sweep-masks", default="causal",
                  help="masks the tile candidates run on (first shape only), comma-separated")
  args = ap.parse_args(argv)

  on_gpu = jax.default_backend() == "gpu"
  quick = args.quick or not on_gpu
  if quick:
    seqs, tokens, heads, d, window, n_sink = [128, 256], 512, 2, 32, 32, 4
    default_impls = "dispatch,xla,pallas_gpu,reference"
  else:
    seqs, tokens, heads, d, window, n_sink = [16384, 4096], 16384, 16, 128, 1024, 64
    default_impls = ("jax_cudnn,pallas_gpu,dispatch,jax_pallas_tuned,jax_pallas,"
                     "tokamax_mosaic,tokamax_triton")
  seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else seqs
  tokens = args.tokens or tokens
  heads = args.heads or heads
  d = args.head_dim or d
  window = args.window or window
  shapes = [Shape(max(1, tokens // s), s, heads, d, args.dtype) for s in seqs]
  problems = make_problems(shapes, args.masks.split(","), window=window,
                           moa_density=args.moa_density, n_sink=n_sink)
  impls = implementations((args.impls or default_impls).split(","), on_gpu, args.sweep)
  env = _env()
  out_dir = pathlib.Path(args.out)
  records, start = [], time.perf_counter()
  print(f"bench_attention: {env['device']} jax {env['jax']}, {len(problems)} problems x "
        f"{len(impls)} implementations", flush=True)
  for p in problems:
    for impl_name, make in impls.items():
      if "[" in impl_name and (p.shape != shapes[0]
                               or p.mask_name not in args.sweep_masks.split(",")):
        continue  # tile candidates: on the first shape and the --sweep-masks only
      base = dict(impl=impl_name, shape=p.shape.name, mask=p.mask_name, density=p.density,
                  density_vs_causal=p.density / CAUSAL.density(p.shape.s, p.shape.s),
                  visited_pairs=p.visited_pairs, dtype=p.shape.dtype, heads=p.shape.h,
                  head_dim=p.shape.d)
      if impl_name == "dispatch":
        base["dispatched"] = dispatch_choice(p)
        same = [r for r in records if r["impl"] == base["dispatched"] and r["mask"] == p.mask_name
                and r["shape"] == p.shape.name]
        if same:  # already measured under its own name in this run: reuse, don't recompile
          records.extend(r | {"impl": "dispatch", "dispatched": base["dispatched"]} for r in same)
          continue
      if impl_name == "reference" and p.shape.b * p.shape.h * p.shape.s ** 2 * 4 > 2 ** 31:
        records.append(base | dict(status="skipped", error="dense scores would exceed 2 GiB"))
        continue
      if time.perf_counter() - start > args.budget_s:
        records.append(base | dict(status="skipped", error="--budget-s reached"))
        continue
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          rows = measure(impl_name, make, p, args.reps, budget_s=2.0,
                         profile=args.profile and impl_name in ("pallas_gpu", "jax_cudnn"))
      except ImportError as e:
        rows = [dict(status="unavailable", error=str(e))]
      except Exception as e:  # noqa: BLE001 - a failing peer must not stop the run
        traceback.print_exc()
        rows = [dict(status="error", error=f"{type(e).__name__}: {e}")]
      for row in rows:
        rec = base | {("pass" if k == "pass_" else k): v for k, v in row.items()}
        records.append(rec)
        if rec["status"] == "ok":
          print(f"{p.shape.name:>9} {p.mask_name:>7} {impl_name:>22} {rec['pass']:>7} "
                f"{rec['time_ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s "
                f"{rec['temp_bytes'] / 2**20:8.1f} MiB", flush=True)
        else:
          print(f"{p.shape.name:>9} {p.mask_name:>7} {impl_name:>22} {rec['status']} "
                f"{rec.get('error', '')[:100]}", flush=True)
      write_report(out_dir, env, records)
  print(write_report(out_dir, env, records))


if __name__ == "__main__":
  main()
