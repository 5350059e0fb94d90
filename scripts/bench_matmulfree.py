"""Benchmark the MatMul-free LM's pieces: packed ternary matmul, decoding, memory.

Reports (JSON + Markdown in --out):
  matmul:  y = x @ W at LLM shapes, W ternary packed 2 bits/weight (memx `xla`, `pallas_gpu` on
           GPU, int8 activations) vs a bf16 dot. `ms` is device time per call
           (memx.timing.per_call_device_time): 2k calls in one compiled program, cycling
           through `copies` distinct copies of x and W that together fill twice the GPU's L2,
           timed over k and over 2k calls and differenced, so neither host dispatch and sync
           nor a weight the previous call left in L2 is counted (a decode reads every layer's
           own weights from HBM). `GB/s` is the bytes each form must move (x, W, y
           once; the packed weight is K/4·N bytes against 2·K·N for bf16) over `ms`: near the
           HBM bandwidth means memory-bound. `wall ms` is the old number, the median host
           wall-clock of one call ended by block_until_ready, launch and sync included.
  decode:  tokens/s of batch-1 greedy decode steps (one compiled scan over a donated cache,
           the prefill untimed) for the MatMul-free LM (packed inference form) and a
           Transformer of the same width and depth.
  memory:  weight bytes (packed vs bf16 vs fp32), the compiled training step's temporary
           bytes of both models (XLA memory analysis), and decode-state bytes vs the
           Transformer's KV cache at several lengths.

  python scripts/bench_matmulfree.py --out $OUT/bench_mf            # GPU: full shapes
  python scripts/bench_matmulfree.py --out $OUT/bench_mf --matmul   # GPU: the matmul table only
  python scripts/bench_matmulfree.py --out /tmp/bmf --quick          # CPU: small shapes (~1 min)
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memx._io import atomic_file, write_json
from memx.kernels.linear_scan.api import gpu_backend
from memx.kernels.ternary import (
  absmean_quantize,
  pack_ternary,
  packed_matmul,
  packed_rows,
  to_words,
)
from memx.kernels.ternary.config import BlockSizes as TernaryBlockSizes
from memx.models.config import ModelConfig, matmulfree_config
from memx.models.decode import cache_bytes
from memx.models.packed import pack_model
from memx.models.transformer import TransformerLM
from memx.nn.bitlinear import BitLinear
from memx.sparse.evaluate import decode_tokens_per_s
from memx.timing import median_time, per_call_device_time, profile_kernel_times
from memx.train.loss import lm_token_losses
from memx.train.memory import saved_activation_bytes

# (d_model, layers, vocab): the quick LM, then roughly the paper's 370M, 1.3B and 2.7B shapes.
WEIGHT_SIZES = [(128, 2, 512), (1024, 24, 32000), (2048, 24, 32000), (2560, 32, 32000)]


# H100 and H200 L2 (50 MB). The distinct copies of a form's operands fill twice that, so every
# call reads them from HBM; calls cycle through the copies until each half of the timed calls
# is >= MIN_CALLS long (~0.5 ms at the fastest, 1 x 4096 x 4096 ~15 µs a call), so the host's
# timing jitter, divided by the calls, stays ~1 µs (on an H100 the result was within 3 µs of
# the profiler's kernel time per call at M = 1, for the bf16 dot and the packed kernel). A CPU
# run is a smoke test (the cache argument is a GPU one): 2 copies, 2 calls a half.
GPU_L2_BYTES = 50 * 2**20
MIN_CALLS = 32


def _plan(set_bytes: int) -> tuple[int, int]:
  """(distinct copies c, calls k in each half) for per_call_device_time; c divides k."""
  if not gpu_backend():
    return 2, 2
  c = max(4, -(-2 * GPU_L2_BYTES // set_bytes))
  return c, c * -(-MIN_CALLS // c)


def _timed(fn, args: tuple, row_bytes: int, reps: int) -> dict:
  """Device ms per call of fn over distinct copies of args (values equal: the timing does not
  see them), the GB/s that implies for row_bytes, and the old host wall-clock ms of one call."""
  c, k = _plan(sum(a.nbytes for a in args))
  copies = [tuple(jnp.array(a, copy=True) for a in args) for _ in range(c)]
  t = per_call_device_time(fn, copies * (2 * k // c), reps)
  del copies  # free them before the next form allocates its own
  wall = median_time(jax.jit(fn), args, reps)
  return {"copies": c, "calls": 2 * k, "ms": t * 1e3, "GB/s": row_bytes / t / 1e9,
          "wall ms": wall * 1e3, "bytes": row_bytes}


def bench_matmul(shapes, reps: int, on_rows=None) -> list[dict]:
  """bf16 dot vs packed matmul at each shape; on_rows(rows) after every shape (saving)."""
  rows = []
  forms = ["xla"] + (["pallas_gpu"] if gpu_backend() else [])
  for m, k, n in shapes:
    key = jax.random.key(0)
    w = jax.random.normal(key, (k, n), jnp.float32)
    codes, _ = absmean_quantize(w)
    packed = pack_ternary(codes)
    xq = jax.random.randint(key, (m, k), -127, 128).astype(jnp.int8)
    xb = jax.random.normal(key, (m, k), jnp.bfloat16)
    wb = w.astype(jnp.bfloat16)
    del w
    bf16 = _timed(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), (xb, wb),
                  2 * m * k + 2 * k * n + 4 * m * n, reps)
    rows.append({"shape": f"{m}x{k}x{n}", "form": "bf16 dot", **bf16, "vs_bf16": 1.0})
    # Words (`to_words`, the layout PackedBitLinear serves from): the same bytes, loaded 16
    # weights per 32-bit load by the decode kernel.
    layouts = [("", packed)] + ([(" words", to_words(packed))] if n % 4 == 0 else [])
    timed = [(form, name, p) for form in forms for name, p in layouts
             if form == "pallas_gpu" or not name]
    for form, name, p in timed:
      f = lambda x, p, form=form: packed_matmul(x, p, implementation=form)  # noqa: E731
      r = _timed(f, (xq, p), m * k + p.nbytes + 4 + 4 * m * n, reps)
      if form == "pallas_gpu":  # where the call's time goes: the kernel and the XLA around it
        r["kernels_us"] = profile_kernel_times(jax.jit(f), (xq, p))
      rows.append({"shape": f"{m}x{k}x{n}", "form": f"packed {form}{name} (int8 x)", **r,
                   "vs_bf16": r["ms"] / bf16["ms"]})
    print(*rows[-1 - len(timed):], sep="\n", flush=True)
    if on_rows:
      on_rows(rows)
  return rows


# Tile candidates for --sweep (name: block_m x block_n x block_k, warps, stages). M = 1..16 rows
# need more programs than 64x128 tiles give (N / 128 of them): narrower tiles, and small M.
SWEEP = {
    "m16n32k256_w4s3": TernaryBlockSizes(block_m=16, block_n=32, block_k=256),
    "m16n64k256_w4s3": TernaryBlockSizes(block_m=16, block_n=64, block_k=256),
    "m16n64k512_w4s4": TernaryBlockSizes(block_m=16, block_n=64, block_k=512, num_stages=4),
    "m64n64k256_w4s3": TernaryBlockSizes(block_m=64, block_n=64, block_k=256),
    "m128n128k256_w8s3": TernaryBlockSizes(block_m=128, block_n=128, block_k=256, num_warps=8),
    "m128n128k128_w8s4": TernaryBlockSizes(block_m=128, block_n=128, block_k=128, num_warps=8,
                                           num_stages=4),
    "m128n256k128_w8s3": TernaryBlockSizes(block_m=128, block_n=256, block_k=128, num_warps=8),
    # Split K (session 8): at M = 1 the default's N / 64 = 64 programs streamed the weight at
    # ~344 GB/s on an H100; K slices multiply the programs, a small sum adds the partials.
    "m16n64k512_s4": TernaryBlockSizes(block_m=16, block_n=64, block_k=512, split_k=4,
                                       num_stages=4),
    "m16n64k256_s8": TernaryBlockSizes(block_m=16, block_n=64, block_k=256, split_k=8),
    "m16n64k256_s16": TernaryBlockSizes(block_m=16, block_n=64, block_k=256, split_k=16),
    "m16n128k256_s8": TernaryBlockSizes(block_m=16, block_n=128, block_k=256, split_k=8),
    "m16n32k256_s8": TernaryBlockSizes(block_m=16, block_n=32, block_k=256, split_k=8),
    # The CUDA-core decode (session 9, `BlockSizes.vector`): one row per program, no x
    # permutation; which column tile, K step, split and launch settings stream best.
    **{f"vec_n{n}k{k}_s{sp}{tag}": TernaryBlockSizes(block_n=n, block_k=k, split_k=sp, vector=True,
                                                     **kw)
       for n, k, sp, tag, kw in ((64, 256, 1, "", {}), (64, 256, 2, "", {}), (64, 256, 4, "", {}),
                                 (64, 256, 8, "", {}), (32, 256, 4, "", {}),
                                 (128, 128, 4, "", {}), (128, 128, 8, "", {}),
                                 (256, 64, 4, "", {}), (32, 512, 1, "", {}),
                                 (64, 256, 4, "_w2", {"num_warps": 2}),
                                 (64, 256, 4, "_w8", {"num_warps": 8}),
                                 (64, 256, 4, "_st4", {"num_stages": 4}))},
}


def bench_sweep(shapes, reps: int, tiles=None, on_rows=None) -> list[dict]:
  """Times pallas_gpu tile candidates at each shape (int8 activations), next to the default:
  device ms per call as in bench_matmul; on_rows(rows) after every candidate (saving)."""
  rows = []
  for m, k, n in shapes:
    key = jax.random.key(0)
    packed = pack_ternary(absmean_quantize(jax.random.normal(key, (k, n), jnp.float32))[0])
    xq = jax.random.randint(key, (m, k), -127, 128).astype(jnp.int8)
    want = packed_matmul(xq, packed, implementation="xla")
    candidates = {"default": None, **{k: v for k, v in SWEEP.items() if not tiles or k in tiles}}
    words = to_words(packed) if n % 4 == 0 else packed
    for name, bs in candidates.items():
      f = lambda x, p, bs=bs: packed_matmul(x, p, implementation="pallas_gpu",  # noqa: E731
                                            block_sizes=bs)
      # Vector candidates run on words (what the model serves from), dot candidates on bytes.
      w = words if (bs or TernaryBlockSizes.get_default("pallas_gpu", rows=m)).vector else packed
      try:
        exact = bool(jnp.array_equal(jax.jit(f)(xq, w), want))
        r = _timed(f, (xq, w), m * k + w.nbytes + 4 + 4 * m * n, reps)
        rows.append({"shape": f"{m}x{k}x{n}", "tiles": name, **r, "exact": exact})
      except Exception as e:  # noqa: BLE001 - a candidate that does not compile is a result too
        rows.append({"shape": f"{m}x{k}x{n}", "tiles": name, "copies": 0, "calls": 0,
                     "ms": float("nan"), "GB/s": float("nan"), "wall ms": float("nan"), "bytes": 0,
                     "exact": f"{type(e).__name__}: {str(e)[:120]}"})
      print(rows[-1], flush=True)
      if on_rows:
        on_rows(rows)
  return rows


def _models(d: int, layers: int, vocab: int):
  heads = max(1, d // 64)
  mf = matmulfree_config(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads)
  tf = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads)
  return mf, tf


def bench_decode(d, layers, vocab, prompt, new, reps) -> list[dict]:
  """Decode tokens/s at batch 1: `new` steps after a `prompt`-token prefill, the steps alone
  timed (one compiled scan over a donated cache, as generation runs them; the prefill and
  generate()'s host-side checks are outside the timer)."""
  mf, tf = _models(d, layers, vocab)
  rows = []
  for name, cfg, pack in (("matmulfree (packed)", mf, True), ("transformer", tf, False)):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    if pack:
      pack_model(model)
    tps = decode_tokens_per_s(model, prompt + new, new_tokens=new, batch=1, repeats=reps)
    rows.append({"model": name, "new_tokens": new, "s": new / tps, "tokens_per_s": tps})
  return rows


def train_memory(cfg, batch: int, seq: int, vocab_block: int = 0) -> dict:
  """Exact memory of one AdamW training step (compiled, not run): arguments (parameters,
  optimizer state, tokens), the compiler's temporaries (gradients, activations, workspace) and
  the activation bytes kept for the backward pass. vocab_block > 0: the loss never forms the
  [B, T, V] logits (memx.kernels.cross_entropy, as train.loss_vocab_block)."""
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)
  tokens = jnp.zeros((batch, seq + 1), jnp.int32)

  def loss_fn(p):  # the train step's loss (memx.train.step), with or without vocabulary blocks
    return lm_token_losses(nnx.merge(graphdef, p, rest), tokens[:, :-1], tokens[:, 1:],
                           vocab_block=vocab_block).mean()

  def step(params, opt, tokens):
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  mem = jax.jit(step).lower(params, opt, tokens).compile().memory_analysis()
  args, temp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
  return {"argument_bytes": args, "temp_bytes": temp, "total_bytes": args + temp,
          "saved_activation_bytes": saved_activation_bytes(loss_fn, params)}


def train_memory_table(d, layers, vocab, batch, seq) -> list[dict]:
  """MatMul-free vs Transformer: plain; with the blocked-vocabulary loss; with per-block remat
  of everything but the dots."""
  mf, tf = _models(d, layers, vocab)
  rows = []
  vocab_block = min(4096, max(256, vocab // 4))  # four blocks or more once vocab >= 1024
  for remat, block in (("none", 0), ("none", vocab_block), ("dots", 0)):
    res = {name: train_memory(dataclasses.replace(cfg, remat=remat), batch, seq, block)
           for name, cfg in (("matmulfree", mf), ("transformer", tf))}
    for key in ("total_bytes", "temp_bytes", "saved_activation_bytes"):
      a, b = res["matmulfree"][key], res["transformer"][key]
      rows.append({"d/layers/vocab/batch/seq": f"{d}/{layers}/{vocab}/{batch}/{seq}",
                   "remat": remat,
                   "loss": f"vocab blocks of {block}" if block else "full logits",
                   "measure": key, "matmulfree": a, "transformer": b, "ratio": a / b})
  return rows


def weight_table(sizes) -> list[dict]:
  """Inference weight bytes by model size, exact from the parameter shapes (nothing allocated):
  packed = 2-bit BitLinear codes + an fp32 scale each, every other parameter in bf16."""
  rows = []
  for d, layers, vocab in sizes:
    mf, _ = _models(d, layers, vocab)
    model = nnx.eval_shape(lambda cfg=mf: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    ternary = [m.weight.shape for _, m in model.iter_modules() if isinstance(m, BitLinear)]
    n_ternary = sum(k * n for k, n in ternary)
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    packed_ternary = sum(packed_rows(k) * n + 4 for k, n in ternary)
    packed_model = packed_ternary + 2 * (n_all - n_ternary)
    rows.append({"d/layers/vocab": f"{d}/{layers}/{vocab}", "params": n_all,
                 "ternary share": n_ternary / n_all,
                 "projections bf16/packed": 2 * n_ternary / packed_ternary,
                 "model bf16 bytes": 2 * n_all, "model packed bytes": packed_model,
                 "model bf16/packed": 2 * n_all / packed_model})
  return rows


def bench_memory(d, layers, vocab, batch, seq, lengths, train_sizes) -> dict:
  mf, tf = _models(d, layers, vocab)
  model = TransformerLM(mf, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  packed = pack_model(nnx.clone(model))
  packed_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(packed)))
  weights = {"params": n_params, "fp32_bytes": 4 * n_params, "bf16_bytes": 2 * n_params,
             "packed_bytes (2-bit ternary + fp32 rest)": packed_bytes}
  train = [row for size in [(d, layers, vocab, batch, seq), *train_sizes]
           for row in train_memory_table(*size)]
  tmodel = TransformerLM(tf, rngs=nnx.Rngs(0))
  state = [{"length": n, "matmulfree_state_bytes": cache_bytes(model.init_cache(1, n)),
            "transformer_kv_bytes": cache_bytes(
                jax.eval_shape(lambda n=n: tmodel.init_cache(1, n)))}
           for n in lengths]
  return {"weights": weights, "weights_by_size": weight_table(WEIGHT_SIZES),
          "train_step": train, "decode_state_per_sequence": state}


def _cpu_train_memory_without_ynn(sizes) -> list[dict] | None:
  """The train-step table again in a fresh process with XLA:CPU's YNNPACK fusions off.

  Those fusions take full-size materialised broadcasts as inputs (e.g. a per-token scale
  broadcast to [B, T, D]) and keep them live, which a GPU compile does not; element-wise-heavy
  models (the MatMul-free LM) pay for that more. Reported beside the default-flag numbers."""
  if jax.default_backend() != "cpu":
    return None
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()
  out = subprocess.run([sys.executable, __file__, "--train-memory-json", json.dumps(sizes)],
                       env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _md(rows: list[dict]) -> str:
  if not rows:
    return ""
  keys = list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                   + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]) + "\n"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out")
  ap.add_argument("--quick", action="store_true", help="small shapes for a CPU run")
  ap.add_argument("--sweep", action="store_true",
                  help="only time pallas_gpu tile candidates of the packed matmul (GPU)")
  ap.add_argument("--matmul", action="store_true", help="only the packed matmul table")
  ap.add_argument("--shapes", default=None,
                  help="matmul shapes MxKxN,... (default: the size's LLM shapes)")
  ap.add_argument("--tiles", default=None,
                  help="--sweep: only these candidates (names from SWEEP, comma-separated)")
  ap.add_argument("--train-memory-json", help=argparse.SUPPRESS)  # child of the no-YNN rerun
  args = ap.parse_args(argv)
  if args.train_memory_json:
    sizes = json.loads(args.train_memory_json)
    print(json.dumps([row for size in sizes for row in train_memory_table(*size)]))
    return
  if not args.out:
    ap.error("--out is required")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.quick:
    shapes, reps = [(1, 1024, 1024), (16, 1024, 2816)], 5
    dec = {"d": 128, "layers": 2, "vocab": 512, "prompt": 16, "new": 32, "reps": 3}
    mem = {"d": 128, "layers": 2, "vocab": 512, "batch": 4, "seq": 128}
    # compiled only, never run: cheap on a CPU. A byte vocabulary, then an LLM-sized one.
    train_sizes = [(512, 4, 4096, 8, 2048), (512, 4, 32000, 8, 2048)]
  else:
    # Batch-1 decode at the three projection shapes of a 4096-wide LLM (the goal), then more rows.
    shapes, reps = [(1, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096), (16, 4096, 11008),
                    (256, 4096, 4096), (4096, 4096, 4096)], 20
    dec = {"d": 1024, "layers": 8, "vocab": 32000, "prompt": 128, "new": 256, "reps": 3}
    mem = {"d": 1024, "layers": 8, "vocab": 32000, "batch": 8, "seq": 2048}
    train_sizes = []
  if args.shapes:
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
  if args.sweep:
    def save_sweep(rows):  # after every candidate: a time limit keeps what finished
      write_json(out / "sweep.json", rows)
      with atomic_file(out / "sweep.md") as f:
        f.write(_md(rows))
    rows = bench_sweep(shapes, reps, args.tiles.split(",") if args.tiles else None, save_sweep)
    print(_md(rows))
    return
  lengths = (1024, 4096, 16384, 65536)
  result = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "quick": args.quick,
      "settings": {"decode": dec, "memory": mem, "train_sizes": train_sizes},
  }
  # The timed sections first (the GPU goal is the packed matmul), each saved as it finishes,
  # so a time limit that cuts the memory compiles short still leaves their numbers.
  def save_matmul(rows):  # after every shape: a time limit keeps the shapes that finished
    write_json(out / "results.json", {**result, "matmul": rows})
    with atomic_file(out / "results.md") as f:
      f.write(f"# Packed matmul ({result['device']}, {result['date']})\n\n" + _md(rows))

  for key, fn in (("matmul", lambda: bench_matmul(shapes, reps, save_matmul)),
                  ("decode", lambda: bench_decode(**dec))):
    result[key] = fn()
    write_json(out / "results.json", result)
    if args.matmul:
      print((out / "results.md").read_text())
      return
  memory = bench_memory(**mem, lengths=lengths, train_sizes=train_sizes)
  all_sizes = [[mem["d"], mem["layers"], mem["vocab"], mem["batch"], mem["seq"]],
               *map(list, train_sizes)]
  memory["train_step_cpu_without_ynn_fusion"] = _cpu_train_memory_without_ynn(all_sizes)
  result["memory"] = memory
  write_json(out / "results.json", result)
  m = result["memory"]
  md = (f"# MatMul-free LM benchmark ({result['device']}, {result['date']})\n\n## Packed matmul\n\n"
        + _md(result["matmul"]) + "\n## Decode\n\n" + _md(result["decode"])
        + "\n## Weights\n\n" + _md([m["weights"]])
        + "\n## Inference weights by model size (exact, from shapes)\n\n"
        + _md(m["weights_by_size"])
        + "\n## Training step memory (compiled, AdamW, fp32)\n\n" + _md(m["train_step"])
        + ("\n## Training step memory, XLA:CPU YNNPACK fusions off\n\n"
           + _md(m["train_step_cpu_without_ynn_fusion"])
           if m["train_step_cpu_without_ynn_fusion"] else "")
        + "\n## Decode state per sequence\n\n" + _md(m["decode_state_per_sequence"]))
  with atomic_file(out / "results.md") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
