"""Benchmark what the backward pass keeps and what it recomputes, per token mixer and remat mode.

For an LM of each mixer (attention, mamba2, linear_attention, mlgru), one AdamW train step,
compiled and never run: the step's exact memory (arguments + XLA temporaries), the activation
bytes kept for the backward pass (`memx.train.memory.saved_activation_bytes`) and XLA's FLOP
count. Rows, all from the same run:
  none          memx as it is: each layer recomputes its element-wise work (Mamba2,
                LinearAttention, MLGRU, the GLU/SwiGLU products)
  none, plain   baseline: the same model with every jax.checkpoint removed (the custom VJPs
                of rms_norm and bitlinear still keep only their inputs)
  dots          remat="dots": matmul outputs and the attention/SSD kernels' named results kept
  dots, matmuls baseline: the matmul-only policy (reruns attention and SSD forward passes)
  offload       remat="offload": "dots" with the matmul outputs kept in pinned host memory
                (host_temp_bytes; on CPU the offload compiles away and it equals "dots")
Writes results.json and results.md to --out.

  python scripts/bench_remat.py --out $OUT/bench_remat             # GPU: d 1024, 8 layers
  python scripts/bench_remat.py --out /tmp/br --quick               # CPU: d 256, 2 layers
"""

import argparse
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from memx.benchmark import write_results
from memx.models import transformer
from memx.models.config import ModelConfig, matmulfree_config
from memx.models.transformer import TransformerLM
from memx.train.loss import lm_token_losses
from memx.train.memory import saved_activation_bytes

MIXERS = ("attention", "mamba2", "linear_attention", "mlgru")


@contextlib.contextmanager
def _no_checkpoints():
  """Every jax.checkpoint becomes the identity (the 'plain' baseline)."""
  saved = jax.checkpoint
  jax.checkpoint = lambda f, *a, **k: f
  try:
    yield
  finally:
    jax.checkpoint = saved


@contextlib.contextmanager
def _matmul_only_dots():
  saved = transformer.REMAT_POLICIES["dots"]
  transformer.REMAT_POLICIES["dots"] = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  try:
    yield
  finally:
    transformer.REMAT_POLICIES["dots"] = saved


def _config(mixer: str, d: int, layers: int, vocab: int) -> ModelConfig:
  heads = max(1, d // 64)
  if mixer == "mlgru":
    return matmulfree_config(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads)
  return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                     mixers=(mixer,) * layers)


def measure(cfg: ModelConfig, batch: int, seq: int) -> dict:
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)
  tokens = jnp.zeros((batch, seq + 1), jnp.int32)

  def loss_fn(p):
    return lm_token_losses(nnx.merge(graphdef, p, rest), tokens[:, :-1], tokens[:, 1:]).mean()

  def step(params, opt):
    g = jax.grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt

  compiled = jax.jit(step).lower(params, opt).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost if isinstance(cost, dict) else cost[0]
  # XLA's cost analysis leaves out library calls (cuBLAS GEMMs, cuDNN) on GPUs: there its FLOP
  # count is not the step's, so it is not reported.
  flops = float(cost["flops"]) / 1e9 if jax.default_backend() == "cpu" else None
  return {"step_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
          # remat="offload"'s saved matmul outputs, in host memory (0 on CPU: no offload there)
          "host_temp_bytes": int(getattr(mem, "host_temp_size_in_bytes", 0) or 0),
          "saved_activation_bytes": saved_activation_bytes(loss_fn, params),
          "gflops": flops}


def bench(d: int, layers: int, vocab: int, batch: int, seq: int, mixers) -> list[dict]:
  rows = []
  variants = (("none", "none", contextlib.nullcontext), ("none, plain", "none", _no_checkpoints),
              ("dots", "dots", contextlib.nullcontext),
              ("dots, matmuls", "dots", _matmul_only_dots),
              ("offload", "offload", contextlib.nullcontext))
  for mixer in mixers:
    base = _config(mixer, d, layers, vocab)
    res = {}
    for name, remat, ctx in variants:
      with ctx():
        res[name] = measure(dataclasses.replace(base, remat=remat), batch, seq)
      print(mixer, name, res[name], flush=True)
    for name, r in res.items():
      ref = res["none, plain" if name.startswith("none") else "dots, matmuls"]
      rows.append({"mixer": mixer, "variant": name, **r,
                   "step vs baseline": r["step_bytes"] / ref["step_bytes"],
                   "saved vs baseline": r["saved_activation_bytes"] /
                   ref["saved_activation_bytes"],
                   "flops vs remat none": (None if r["gflops"] is None
                                           else r["gflops"] / res["none"]["gflops"])})
  return rows


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="CPU sizes")
  ap.add_argument("--mixers", default=",".join(MIXERS))
  args = ap.parse_args(argv)
  if args.quick:
    s = {"d": 256, "layers": 2, "vocab": 4096, "batch": 2, "seq": 2048}
  else:
    s = {"d": 1024, "layers": 8, "vocab": 32000, "batch": 4, "seq": 4096}
  rows = bench(**s, mixers=tuple(args.mixers.split(",")))
  md = write_results(args.out, "Remat benchmark", s, rows)
  print(md)


if __name__ == "__main__":
  main()
