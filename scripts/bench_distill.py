"""Benchmark a Transformer teacher against its distilled linear (all Mamba-2) and hybrid students.

Per sequence length L (batch 1 unless --batch) and model:
  prefill:  median wall time of the compiled `model.prefill(tokens, max_len=L,
            last_logits=True)` (the last position's logits and the decode state), after a
            warm-up call, each call ended by block_until_ready; and its compiled memory (XLA
            memory_analysis: temporaries + outputs, i.e. activations and the returned decode
            state; parameters excluded, listed once). A form whose compiled memory would not
            fit the device is skipped.
  decode:   time per token of 16 `decode_step`s in one compiled scan (as `generate` runs
            them; a host call per token would time Python dispatch) with a cache for L tokens,
            and the bytes of that decode state (KV caches for attention layers, fixed-size SSM
            states).
The models have the same width, depth and heads; weights are random (times and memory do not
depend on them), the students' shapes are those `memx.distill.seed.student_model_config` gives
(per-head Mamba-2, N = P = head dim). Summary lines: the crossover length (shortest L where the
student's prefill is faster than the teacher's) and, at the longest length both ran, the
teacher/student time ratio and the student's memory reduction.

  python scripts/bench_distill.py --out /tmp/bd --quick   # CPU: d128, 2 layers, fp32, lengths
                                                          # 256..16k, teacher up to 8k (~3 min)
  python scripts/bench_distill.py --out $OUT/bench_distill  # GPU: d1024, 16 heads (4 KV), 8
                                                            # layers, bf16, lengths 4k..64k
  (scripts/gpu_check.sh runs 4 layers at 16k, 64k and 128k, the teacher up to 64k, to fit its
  time budget.)
Chunked prefill (--prefill-chunks whole,2048: one table per mode): `prefill(chunk_size=C)` runs
the prompt C tokens at a time, so activations follow C and only the decode state grows with L
(the teacher's KV cache; nothing for the linear student). --memory-only compiles without
running: exact memory for GPU-sized models on a CPU. XLA:CPU's own scheduling then inflates it,
so read CPU memory with
  XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false
             --xla_cpu_experimental_ynn_fusion_type="
(the concurrency-optimised scheduler hoists data-independent buffers, such as each chunk's scan
output fill, to the start and keeps them all alive; YNNPACK fusions materialise broadcasts and
fp32 copies of bf16 weights; neither happens on GPU). fp32 on CPU: bf16 dots run on fp32 copies.

Goal (H100): the linear student's decode memory stays constant in L; at 64k its prefill is
≥ 5x faster than the teacher's with ≥ 70% less memory.
"""

import argparse
import datetime
import pathlib
import subprocess
import sys

import jax

from memx._device import memory_limit
from memx._io import atomic_file, write_json
from memx.distill.config import StudentConfig
from memx.distill.seed import student_model_config
from memx.distill.speed import (
    best_of_modes,
    fmt_bytes,
    fmt_ms,
    markdown,
    measure,
    summarize,
)
from memx.models.config import ModelConfig


def model_configs(args, names=None) -> dict[str, ModelConfig]:
  """teacher, linear and hybrid{every} configs (only `names` when given: a hybrid needs more
  than one layer)."""
  teacher = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                        n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                        param_dtype=args.dtype, compute_dtype=args.dtype)
  makers = {
      "teacher": lambda: teacher,
      "linear": lambda: student_model_config(teacher, StudentConfig(chunk_size=args.chunk)),
      f"hybrid{args.every}": lambda: student_model_config(
          teacher, StudentConfig(kind="hybrid", every=args.every, chunk_size=args.chunk)),
  }
  return {k: make() for k, make in makers.items() if names is None or k in names}


def _env() -> dict:
  dev = jax.devices()[0]
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"date": datetime.date.today().isoformat(), "device": dev.device_kind,
          "platform": dev.platform, "jax": jax.__version__, "commit": commit}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--quick", action="store_true",
                 help="CPU: small model, lengths 256..16384, the teacher up to 8192")
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--n-layers", type=int, default=8)
  p.add_argument("--n-heads", type=int, default=16)
  p.add_argument("--n-kv-heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--every", type=int, default=2, help="hybrid: attention at layers i %% every")
  p.add_argument("--chunk", type=int, default=128, help="SSD chunk length of the students")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
  p.add_argument("--teacher-max", type=int, default=None,
                 help="longest length to run the teacher at (students go on beyond it)")
  p.add_argument("--prefill-chunks", default="whole",
                 help="comma list of prefill modes: 'whole' (the prompt at once) and/or chunk "
                      "sizes (TransformerLM.prefill's chunk_size), each a table of its own")
  p.add_argument("--memory-only", action="store_true",
                 help="compile only: prefill memory and state bytes, no times (exact on CPU "
                      "for any model size)")
  p.add_argument("--models", default=None,
                  help="comma-separated subset of teacher,linear,hybrid2 (default: all)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--budget-s", type=float, default=20.0, help="timing budget per measurement")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.n_layers, args.n_heads, args.n_kv_heads, args.chunk = 128, 2, 4, 2, 64
    args.dtype = "float32"
    if args.lengths == p.get_default("lengths"):
      args.lengths = "256,1024,2048,4096,8192,16384"
    if args.teacher_max is None:
      args.teacher_max = 8192
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lengths = [int(x) for x in args.lengths.split(",")]
  modes = [None if m.strip() == "whole" else int(m) for m in args.prefill_chunks.split(",")]
  cfgs = model_configs(args)
  if args.models:
    cfgs = {k: v for k, v in cfgs.items() if k in args.models.split(",")}
  names = list(cfgs)
  mem_limit = memory_limit()
  env = _env()
  print(f"bench_distill: {env}; d_model {args.d_model}, {args.n_layers} layers, "
        f"{args.n_heads} heads ({args.n_kv_heads} kv), {args.dtype}, batch {args.batch}")
  rows, sections, summary, by_mode = [], [], [], {}
  for mode in modes:
    mode_rows = []
    # Model-major: if a time limit cuts the run short, the hybrid's rows (its attention layers
    # compile one program per chunk) go first, not the teacher's and linear student's.
    for name, cfg in cfgs.items():
      for n in lengths:
        if name == "teacher" and args.teacher_max is not None and n > args.teacher_max:
          continue
        row = measure(name, cfg, n, batch=args.batch, repeats=args.repeats,
                      budget_s=args.budget_s, mem_limit=mem_limit, prefill_chunk=mode,
                      timed=not args.memory_only)
        mode_rows.append(row)
        # Every row as it comes (atomically): a run cut by a time limit keeps them.
        write_json(out / "results.partial.json", {"env": env, "args": vars(args),
                                                  "rows": rows + mode_rows})
        print(f"  L={n:>6} {name:>8} prefill {_mode(mode)}: {fmt_ms(row.get('prefill_s'))} "
              f"ms {fmt_bytes(row.get('prefill_bytes'))} (compiled in "
              f"{row.get('compile_s', float('nan')):.1f} s), decode "
              f"{fmt_ms(row.get('decode_s'))} ms, state {fmt_bytes(row.get('state_bytes'))}",
              flush=True)
    lines = [f"{_mode(mode)}: {line}" for line in summarize(mode_rows, names)]
    sections.append(f"Prefill {_mode(mode)}:\n\n{markdown(mode_rows, names)}\n\n"
                    + "\n".join(lines))
    rows += mode_rows
    summary += lines
    by_mode[_mode(mode)] = mode_rows
  best = best_of_modes(by_mode, names)
  if best:
    sections.append("\n".join(best))
    summary += best
  table = "\n\n".join(sections)
  text = (f"{env}\n\nd_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.n_kv_heads} kv), {args.dtype}, batch {args.batch}; params "
          + ", ".join(f"{m} {p:,}" for m, p in {r["model"]: r["params"] for r in rows}.items())
          + "\n\n" + table + "\n")
  with atomic_file(out / "results.md") as f:
    f.write(text)
  write_json(out / "results.json", {"env": env, "args": vars(args), "rows": rows,
                                    "summary": summary})
  (out / "results.partial.json").unlink(missing_ok=True)
  print(table)
  return 0


def _mode(chunk: int | None) -> str:
  return "whole" if chunk is None else f"in chunks of {chunk}"


if __name__ == "__main__":
  sys.exit(main())
