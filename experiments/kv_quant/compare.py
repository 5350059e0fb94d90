"""Compressed KV caches on a trained run: corpus loss and passkey retrieval through the decode
path with KIVI's quantized caches (8, 4 and 2 bits) and H2O's eviction caches (heavy hitters +
recent tokens, and recent tokens alone at the same budget) against the dense cache and MoA's
per-head span plans, on the same rows, without retraining.

Command:   python experiments/kv_quant/compare.py RUN [--lengths 128,192,256,512]
           (RUN: a trained memx run, e.g. runs/moa/dense from experiments/moa/pipeline.py;
           each evaluation lands in RUN/evaluations/, `memx report` adds them to the report)
Hardware:  CPU, 2 cores: about 25 minutes for runs/moa/dense at the default lengths.
Result (2026-11-28, 2-core CPU, commit 5fcf29e; benchmarks/RESULTS.md, "Session 20"): on the
           MoA experiment's dense model (4 layers, 2 KV heads × 32) 8 bits cost nothing, 4 bits
           +0.0003 nats of corpus loss up to the training length (+0.002 at 512), 2 bits +0.014
           at 128 and +0.056 at 512; the passkey is retrieved at 128-256 tokens by every KIVI
           cache (0.99-1.00). H2O 32 + 32 costs +0.001 to +0.007 nats up to 256 tokens but
           retrieves the passkey at 0.85 / 0.28 / 0.15 (128 / 192 / 256), with SnapKV's pooling
           over 7 positions at 0.93 / 0.93 / 0.89 and with its observation window too at
           0.97 / 0.99 / 0.93; a 64-token window alone retrieves nothing. Claims: KIVI's "2-bit
           KV cache, tuning-free, little quality loss" holds here; H2O's "heavy hitters supply
           most of the attention value" holds for the loss, and for retrieval once neighbouring
           tokens are kept with their peaks. Throughput claims are GPU claims
           (scripts/bench_kv_quant.py).

The dense row runs the plain forward: with an exact cache the decode path gives the same
numbers (tests/kernels/test_kv_quant.py, tests/nn/test_kv_evict.py), so it is the baseline of
every compressed row.
"""

import argparse
import pathlib
import sys

from memx.kernels.kv_quant import KVQuant
from memx.nn.kv_evict import H2O
from memx.sparse.evaluate import evaluate, write_evaluation
from memx.sparse.plan import Plan
from memx.train.restore import load_trained

CACHES = {"dense-ref": None, "kv8g32": KVQuant(8, 32), "kv4g32": KVQuant(4, 32),
          "kv2g32": KVQuant(2, 32), "kv2g16": KVQuant(2, 16),
          # KIVI's own setting: 2 bits, groups of 32, the 128 latest tokens at full precision.
          "kv2g32r128": KVQuant(2, 32, residual=128),
          # H2O: half heavy hitters, half recent tokens; and the same budget as a plain window
          # of recent tokens (what the heavy hitters add).
          "h2o16+16": H2O(16, 16), "h2o32+32": H2O(32, 32), "h2o64+64": H2O(64, 64),
          "h2o0+64": H2O(0, 64),
          # SnapKV's selection: the prompt's last 32 queries (its question) score the prompt.
          "h2o16+16o32": H2O(16, 16, 32), "h2o32+32o32": H2O(32, 32, 32),
          # ... and SnapKV's max-pooling of the scores over 7 positions (whole numbers stay).
          "h2o16+16o32p7": H2O(16, 16, 32, 7), "h2o32+32o32p7": H2O(32, 32, 32, 7),
          "h2o32+32p7": H2O(32, 32, 0, 7),
          # MoA's static per-head spans (plans from experiments/moa/pipeline.py, in
          # RUN/sparse/), evaluated with the same rows as every cache here.
          "moa50-ref": "moa50", "uniform50-ref": "uniform50", "longgen50-ref": "longgen50"}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("run")
  p.add_argument("--lengths", default="128,192,256,512")
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--caches", default=",".join(CACHES), help=",".join(CACHES))
  args = p.parse_args(argv)
  names = args.caches.split(",")
  unknown = sorted(set(names) - set(CACHES))
  if unknown:
    p.error(f"unknown caches {unknown}; choose from {list(CACHES)}")
  lengths = [int(n) for n in args.lengths.split(",")]
  plans = {}
  for name in names:
    if isinstance(CACHES[name], str):
      path = pathlib.Path(args.run) / "sparse" / f"{CACHES[name]}.json"
      if not path.exists():
        p.error(f"{name} needs the plan {path} (experiments/moa/pipeline.py writes it)")
      plans[name] = Plan.load(path)
  trained = load_trained(args.run)
  print(f"{'cache':10s} {'KV B/token':>10s}  corpus loss per length | passkey per length")
  for name in names:
    cache = CACHES[name]
    result = evaluate(trained.model, trained.cfg.data, lengths, batches=args.batches,
                      batch_size=args.batch_size,
                      kv_quant=cache if isinstance(cache, KVQuant) else None,
                      kv_evict=cache if isinstance(cache, H2O) else None,
                      plan=plans[name] if isinstance(cache, str) else None)
    write_evaluation(trained.run_dir, name, result)
    loss = " ".join(f"{result['eval_loss'][str(n)]:.4f}" for n in lengths)
    pk = " ".join(f"{result['passkey_mean'][str(n)]:.2f}" for n in lengths)
    print(f"{name:10s} {result['kv_bytes_per_token'][str(lengths[-1])]:10.0f}  {loss} | {pk}",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
