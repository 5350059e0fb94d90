"""Which heads does the MoA model's retrieval need? Measured head ablations at one length.

Command:   python experiments/moa/head_ablation.py [--workdir runs] [--length 256]
           (after experiments/moa/pipeline.py has trained runs/moa/dense)
What:      on 16 passkey rows at N, the question at the end of the row as in the evaluation
           (the calibration rows place it earlier) (one compiled forward; each
           mask enters as a logit bias through the profile's `score_biases` path):
           1. every head alone cut to a 16-token window + 4 sinks, the others dense;
           2. k = 0..3 heads kept dense and every other head at the widest common window + 4
              sinks that keeps the average density within --budget at N: every k-set of heads
              is tried and the best five by exact match are kept.
           Writes WORKDIR/SWEEP/head_ablation.json and prints both tables.

Result (2-core CPU, 2026-11-27, N = 256, the pipeline's dense model; benchmarks/RESULTS.md,
"MoA experiment"): retrieval is spread over layers. Cut alone to 16 tokens, head 0.3 drops exact
match to 0.25, head 1.0 to 0.56, head 3.3 to 0.44 (the rest stay >= 0.88). At 25% no plan of the
form "k heads dense, the others one window" retrieves: the best is 0.25 (k = 1, head 3.3 dense,
the others 23 tokens); with the three heads above dense the others get 6 tokens, and 0.06. The
16-head model's retrieval circuit does not fit a 25% budget in these rules, so the search at 25%
has no retrieving plan to find. The 32-head `heads8` model (--sweep moa-heads8 --max-dense 2)
retrieves through heads 2.2 and 2.3 alone (cut to 16 tokens: 0.31 and 0.19), and keeping those
two dense with the other 30 at 23 tokens + 4 sinks retrieves 0.94 within 25%: a plan the
search misses.
"""

import argparse
import dataclasses
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx._io import write_json

ROWS = 16


def main(argv=None) -> int:
  from memx.data import make_loader
  from memx.sparse.rules import Rule, density, rules_mask
  from memx.train.loss import token_losses
  from memx.train.restore import load_trained

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs")
  ap.add_argument("--sweep", default="moa", help="the pipeline's sweep directory name")
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--budget", type=float, default=0.25)
  ap.add_argument("--max-dense", type=int, default=3)
  args = ap.parse_args(argv)
  n = args.length
  sweep = pathlib.Path(args.workdir) / args.sweep
  trained = load_trained(sweep / "dense")
  cfg = trained.cfg
  layers, heads = cfg.model.n_layers, cfg.model.n_heads
  data = dataclasses.replace(cfg.data, source="passkey", task=None, task_fraction=0.0,
                             passkey_min_len=None, seq_len=n)
  batch = {k: jnp.asarray(v) for k, v in
           make_loader(data, batch_size=ROWS, seed=999, split="train").local_batch(0).items()}
  graphdef, params = nnx.split(trained.model)

  @jax.jit
  def measure(biases):
    logits = nnx.merge(graphdef, params)(batch["inputs"], score_biases=biases)
    loss = jnp.sum(token_losses(logits, batch["targets"]) * batch["weights"]) / jnp.sum(
        batch["weights"])
    hit = (jnp.argmax(logits, -1) == batch["targets"]) | ~batch["answer_mask"]
    return loss, jnp.mean(hit.all(-1))

  cache = {}

  def bias(rules: tuple[Rule, ...]):
    if rules not in cache:
      mask = rules_mask(rules, n)
      keep = np.stack([np.asarray(mask.dense(n, n, head=h)).reshape(n, n) for h in range(heads)])
      cache[rules] = jnp.asarray(np.where(keep, 0.0, -1e9)[None].repeat(ROWS, 0), jnp.float32)
    return cache[rules]

  def run(plan) -> dict:
    loss, exact = measure({i: bias(tuple(plan[i])) for i in range(layers)})
    return {"loss": round(float(loss), 4), "exact_match": round(float(exact), 4)}

  full = Rule.full()
  out = {"length": n, "budget": args.budget, "dense": run([[full] * heads] * layers),
         "single_head_window16": {}, "k_dense": {}}
  print(f"dense: {out['dense']}")
  for i, h in itertools.product(range(layers), range(heads)):
    plan = [[full] * heads for _ in range(layers)]
    plan[i][h] = Rule(16, 0.0, 4)
    out["single_head_window16"][f"{i}.{h}"] = r = run(plan)
    print(f"head {i}.{h} at 16 + 4 sinks: {r}", flush=True)
  everyone = list(itertools.product(range(layers), range(heads)))
  for k in range(args.max_dense + 1):
    fits = [a for a in range(1, n) if (k + (len(everyone) - k) * density(Rule(a, 0.0, 4), n))
            <= args.budget * len(everyone)]
    if not fits:
      continue
    rest = Rule(max(fits), 0.0, 4)
    rows = []
    for keep in itertools.combinations(everyone, k):
      plan = [[rest] * heads for _ in range(layers)]
      for i, h in keep:
        plan[i][h] = full
      rows.append({"dense_heads": [f"{i}.{h}" for i, h in keep], **run(plan)})
    rows.sort(key=lambda r: (-r["exact_match"], r["loss"]))
    out["k_dense"][str(k)] = {"window": max(fits), "best": rows[:5]}
    print(f"{k} dense, the rest {max(fits)} + 4 sinks: best {rows[:3]}", flush=True)
  path = sweep / "head_ablation.json"
  write_json(path, out, indent=1)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
