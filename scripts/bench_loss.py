"""Benchmark the training loss: full [B, T, V] logits vs vocabulary blocks (train.loss_vocab_block).

For a Transformer LM at one or more vocabulary sizes, one AdamW train step each way, in one run:
median step time (the two forms interleaved, after a warm-up call each) and the compiled step's
temporary bytes (exact, XLA memory analysis). Writes results.json and results.md to --out.

  python scripts/bench_loss.py --out $OUT/bench_loss            # GPU: d 1024, 8 layers
  python scripts/bench_loss.py --out /tmp/bl --quick             # CPU: d 256, 4 layers (~1 min)
"""

import argparse
import statistics
import time

import jax
import optax
from flax import nnx

from memx.benchmark import write_results
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM
from memx.train.loss import lm_token_losses


def _step(cfg: ModelConfig, batch: int, seq: int, vocab_block: int):
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  opt = tx.init(params)
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)

  def step(params, opt, tokens):
    def loss_fn(p):
      return lm_token_losses(nnx.merge(graphdef, p, rest), tokens[:, :-1], tokens[:, 1:],
                             vocab_block=vocab_block).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  compiled = jax.jit(step).lower(params, opt, tokens).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  return (lambda: compiled(params, opt, tokens)), temp


def bench(d: int, layers: int, vocabs, batch: int, seq: int, block: int, reps: int) -> list[dict]:
  rows = []
  for vocab in vocabs:
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=max(1, d // 64))
    blk = max(1, min(block, vocab // 4))  # one block would only add the recomputation
    forms = {"full logits": _step(cfg, batch, seq, 0),
             f"vocab blocks of {blk}": _step(cfg, batch, seq, blk)}
    times = {name: [] for name in forms}
    for fn, _ in forms.values():
      jax.block_until_ready(fn())  # warm-up
    for _ in range(reps):  # interleaved, so both forms see the same machine load
      for name, (fn, _) in forms.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t0)
    base_t = statistics.median(times["full logits"])
    base_m = forms["full logits"][1]
    for name, (_, temp) in forms.items():
      t = statistics.median(times[name])
      rows.append({"vocab": vocab, "loss": name, "step ms": t * 1e3, "vs full (time)": t / base_t,
                   "temp bytes": temp, "vs full (temp)": temp / base_m})
  return rows


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="CPU sizes")
  ap.add_argument("--vocabs", default=None, help="comma-separated vocabulary sizes")
  args = ap.parse_args(argv)
  if args.quick:
    s = {"d": 256, "layers": 4, "vocabs": (4096, 32000), "batch": 8, "seq": 256, "block": 4096,
         "reps": 5}
  else:
    s = {"d": 1024, "layers": 8, "vocabs": (32000, 128000), "batch": 8, "seq": 2048,
         "block": 8192, "reps": 10}
  if args.vocabs:
    s["vocabs"] = tuple(int(v) for v in args.vocabs.split(","))
  rows = bench(**s)
  md = write_results(args.out, "Loss benchmark", s, rows)
  print(md)


if __name__ == "__main__":
  main()
