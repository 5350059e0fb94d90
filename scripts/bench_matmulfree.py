"""Benchmark the MatMul-free LM's pieces: packed ternary matmul, decoding, memory.

Reports (JSON + Markdown in --out):
  matmul:  y = x @ W at LLM shapes, W ternary packed 2 bits/weight (memx `xla`, `pallas_gpu` on
           GPU, int8 activations) vs a bf16 dot: median wall time of compiled calls (warm-up
           first, each ended by block_until_ready) and the bytes each form must move (x, W,
           y once; the packed weight is K/4·N bytes against 2·K·N for bf16).
  decode:  tokens/s of greedy `generate` for the MatMul-free LM (packed inference form) and
           a Transformer of the same width and depth.
  memory:  weight bytes (packed vs bf16 vs fp32), the compiled training step's temporary
           bytes of both models (XLA memory analysis), and decode-state bytes vs the
           Transformer's KV cache at several lengths.

  python scripts/bench_matmulfree.py --out $OUT/bench_mf            # GPU: full shapes
  python scripts/bench_matmulfree.py --out /tmp/bmf --quick          # CPU: small shapes (~1 min)
"""

import argparse
import datetime
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memx.kernels.linear_scan.api import gpu_backend
from memx.kernels.ternary import absmean_quantize, pack_ternary, packed_matmul
from memx.models.config import ModelConfig, matmulfree_config
from memx.models.decode import cache_bytes, generate
from memx.models.packed import pack_model
from memx.models.transformer import TransformerLM


def _time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_matmul(shapes, reps: int) -> list[dict]:
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
    bf16_t = _time(jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                   xb, wb, reps=reps)
    bf16_bytes = 2 * m * k + 2 * k * n + 4 * m * n
    rows.append({"shape": f"{m}x{k}x{n}", "form": "bf16 dot", "ms": bf16_t * 1e3,
                 "bytes": bf16_bytes, "vs_bf16": 1.0})
    for form in forms:
      f = jax.jit(lambda x, p, form=form: packed_matmul(x, p, implementation=form))
      t = _time(f, xq, packed, reps=reps)
      rows.append({"shape": f"{m}x{k}x{n}", "form": f"packed {form} (int8 x)", "ms": t * 1e3,
                   "bytes": m * k + packed.nbytes + 4 + 4 * m * n, "vs_bf16": t / bf16_t})
  return rows


def _models(d: int, layers: int, vocab: int):
  heads = max(1, d // 64)
  mf = matmulfree_config(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads)
  tf = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads)
  return mf, tf


def bench_decode(d, layers, vocab, prompt, new, reps) -> list[dict]:
  mf, tf = _models(d, layers, vocab)
  rows = []
  tokens = jax.random.randint(jax.random.key(0), (1, prompt), 0, vocab)
  for name, cfg, pack in (("matmulfree (packed)", mf, True), ("transformer", tf, False)):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    if pack:
      pack_model(model)
    t = _time(lambda m=model: generate(m, tokens, new), reps=reps)
    rows.append({"model": name, "new_tokens": new, "s": t, "tokens_per_s": new / t})
  return rows


def _temp_bytes(cfg, batch, seq) -> int:
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)
  tokens = jnp.zeros((batch, seq + 1), jnp.int32)

  def step(params, opt, tokens):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  mem = jax.jit(step).lower(params, opt, tokens).compile().memory_analysis()
  return int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1


def bench_memory(d, layers, vocab, batch, seq, lengths) -> dict:
  mf, tf = _models(d, layers, vocab)
  model = TransformerLM(mf, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  packed = pack_model(nnx.clone(model))
  packed_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(packed)))
  weights = {"params": n_params, "fp32_bytes": 4 * n_params, "bf16_bytes": 2 * n_params,
             "packed_bytes (2-bit ternary + fp32 rest)": packed_bytes}
  train = {"matmulfree_temp_bytes": _temp_bytes(mf, batch, seq),
           "transformer_temp_bytes": _temp_bytes(tf, batch, seq), "batch": batch, "seq": seq}
  tmodel = TransformerLM(tf, rngs=nnx.Rngs(0))
  state = [{"length": n, "matmulfree_state_bytes": cache_bytes(model.init_cache(1, n)),
            "transformer_kv_bytes": cache_bytes(
                jax.eval_shape(lambda n=n: tmodel.init_cache(1, n)))}
           for n in lengths]
  return {"weights": weights, "train_step": train, "decode_state_per_sequence": state}


def _md(rows: list[dict]) -> str:
  if not rows:
    return ""
  keys = list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                   + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="small shapes for a CPU run")
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.quick:
    shapes, reps = [(1, 1024, 1024), (16, 1024, 2816)], 5
    dec = {"d": 128, "layers": 2, "vocab": 512, "prompt": 16, "new": 32, "reps": 3}
    mem = {"d": 128, "layers": 2, "vocab": 512, "batch": 4, "seq": 128}
  else:
    shapes, reps = [(1, 4096, 4096), (16, 4096, 11008), (256, 4096, 4096),
                    (4096, 4096, 4096)], 20
    dec = {"d": 1024, "layers": 8, "vocab": 32000, "prompt": 128, "new": 256, "reps": 3}
    mem = {"d": 1024, "layers": 8, "vocab": 32000, "batch": 8, "seq": 2048}
  lengths = (1024, 4096, 16384, 65536)
  result = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "quick": args.quick,
      "matmul": bench_matmul(shapes, reps),
      "decode": bench_decode(**dec),
      "memory": bench_memory(**mem, lengths=lengths),
      "settings": {"decode": dec, "memory": mem},
  }
  (out / "results.json").write_text(json.dumps(result, indent=2))
  m = result["memory"]
  md = (f"# MatMul-free LM benchmark ({result['device']}, {result['date']})\n\n## Packed matmul\n\n"
        + _md(result["matmul"]) + "\n## Decode\n\n" + _md(result["decode"])
        + "\n## Weights\n\n" + _md([m["weights"]]) + "\n## Training step temporaries\n\n"
        + _md([m["train_step"]]) + "\n## Decode state per sequence\n\n"
        + _md(m["decode_state_per_sequence"]))
  tmp = out / "results.md.tmp"
  tmp.write_text(md)
  tmp.replace(out / "results.md")
  print(md)


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
