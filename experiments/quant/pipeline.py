"""Post-training weight quantization: GPTQ against round-to-nearest at 4, 3 and 2 bits (groups of
64 input rows), and QLoRA's NF4, on one trained model, without retraining.

Command:   python experiments/quant/pipeline.py [--variant tiny] [--workdir runs]
           (then `memx report runs/quant` redraws the report)
Steps:     memx run (this file) → memx eval --weight-quant SPEC for each method, as Python calls;
           each evaluation lands in runs/quant/dense/evaluations/.
Hardware:  CPU, 2 cores: "base" ≈ 6 minutes, "tiny" ≈ 1 minute.
Result:    (2026-11-28, commit 3d504b9; benchmarks/RESULTS.md "Session 21") eval loss at 128
           tokens / passkey: dense 1.1557 / 1.00; NF4 (4.13 bits) +0.004 / 1.00; 4-bit RTN and
           GPTQ +0.002 and +0.003 / 1.00; 3-bit RTN +0.023, GPTQ +0.011 / 1.00; 2-bit RTN
           +0.112 / 0.15, GPTQ +0.056 / 1.00. GPTQ halves RTN's loss increase at 3 and 2 bits
           and keeps retrieval where RTN loses it.

The model: 4 layers × 4 heads (2 KV heads), d 128, trained on the embedded corpus with half of
its rows passkey retrieval (3 digits), so both the corpus loss and an exact-match skill show
what quantization costs. Every attention and SwiGLU projection is quantized; the embedding and
norms keep float32 (GPTQ's practice), so "bits per weight" is over the quantized projections.

What it does not show: GPTQ's advantage at LLM scale (outlier features appear with size), nor
speed (on CPU the matmuls dequantize in software).
"""

import argparse
import dataclasses
import json
import pathlib
import sys

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")
METHODS = ("nf4", "rtn:4:64", "gptq:4:64", "rtn:3:64", "gptq:3:64", "rtn:2:64", "gptq:2:64")


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
      data=DataConfig(source="corpus", seq_len=128, task="passkey", task_fraction=0.5,
                      passkey_digits=3),
      optim=OptimConfig(lr=3e-3, warmup_steps=50),
      train=TrainConfig(steps=800, batch_size=16, log_every=50, eval_every=400, eval_batches=4),
      checkpoint=CheckpointConfig(every=400, keep=1),
  )
  if variant == "tiny":  # smoke test: the pipeline's plumbing, not its numbers
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, d_model=64, n_layers=2),
        train=dataclasses.replace(cfg.train, steps=8, batch_size=8, log_every=4, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=8))
  return cfg


def main(argv=None) -> int:
  from memx.cli import main as memx
  from memx.experiment.runner import RunSpec, run_current
  from memx.quant.config import WeightQuant

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="base", choices=VARIANTS)
  ap.add_argument("--workdir", default="runs")
  args = ap.parse_args(argv)
  sweep_dir = pathlib.Path(args.workdir) / ("quant" if args.variant == "base" else
                                            f"quant-{args.variant}")
  run_dir = sweep_dir / "dense"
  run_current(RunSpec(__file__, args.variant, {}, str(sweep_dir), "dense"))
  common = ["--lengths", "128", "--depths", "0.1,0.5,0.9", "--batches", "2",
            "--batch-size", "8"]
  rows = []
  for spec in ("dense", *METHODS):
    extra = ["--name", "dense"] if spec == "dense" else ["--weight-quant", spec]
    if memx(["eval", str(run_dir), *common, *extra]) != 0:
      return 1
    name = "dense" if spec == "dense" else WeightQuant.parse(spec).name
    r = json.loads((run_dir / "evaluations" / f"{name}.json").read_text())
    wq = r.get("weight_quant") or {}
    rows.append((name, wq.get("bits_per_weight", 32.0), r["eval_loss"]["128"],
                 r["passkey_mean"]["128"], wq.get("seconds", 0.0)))
  print(f"\n{'method':<12} {'bits/w':>7} {'eval loss':>10} {'passkey':>8} {'quant s':>8}")
  for name, bits, loss, pk, secs in rows:
    print(f"{name:<12} {bits:>7.3f} {loss:>10.4f} {pk:>8.3f} {secs:>8.1f}")
  return memx(["report", str(sweep_dir)])


if __name__ == "__main__":
  sys.exit(main())
