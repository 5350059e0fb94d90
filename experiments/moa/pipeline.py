"""MoA end to end: train a dense model with retrieval in its data, profile it, search per-head
length-elastic plans at 25% and 50% density, and evaluate them against a uniform window with
sinks (StreamingLLM) and a LongGen-style hybrid at the same budget, without retraining.

Command:   python experiments/moa/pipeline.py [--variant tiny] [--workdir runs]
           (then `memx report runs/moa` redraws the report)
Steps:     memx run (this file) → memx sparse profile → memx sparse search / baseline → memx eval,
           as Python calls; each step's file lands in runs/moa/dense/{sparse,evaluations}/.
Hardware:  CPU, 2 cores: "base" ≈ 10 minutes (training is most of it), "tiny" ≈ 1 minute.

Result (base, 2-core CPU, 2026-11-26; numbers in benchmarks/RESULTS.md, section MoA): see
RESULTS below, filled from the run; the claims it supports or not are stated there.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")

RESULTS = """(filled in after the first full run)"""


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
      # 3/4 of the rows are passkey retrieval (needle at a random depth), 1/4 corpus text.
      data=DataConfig(source="corpus", seq_len=256, task="passkey", task_fraction=0.75,
                      passkey_digits=3),
      optim=OptimConfig(lr=3e-3, warmup_steps=50),
      train=TrainConfig(steps=1200, batch_size=16, log_every=50, eval_every=400,
                        eval_batches=4),
      checkpoint=CheckpointConfig(every=400, keep=1),
  )
  if variant == "tiny":  # smoke test: the pipeline's plumbing, not its numbers
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, d_model=32, n_layers=2),
        data=dataclasses.replace(cfg.data, seq_len=128, passkey_digits=2),
        train=dataclasses.replace(cfg.train, steps=8, batch_size=8, log_every=4, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=8))
  return cfg


@dataclasses.dataclass(frozen=True)
class Settings:
  profile_lengths: tuple[int, ...]
  eval_lengths: tuple[int, ...]
  budgets: tuple[float, ...]
  depths: tuple[float, ...]
  profile_batches: int
  eval_batches: int
  n_sink: int = 4


SETTINGS = {
    "base": Settings(profile_lengths=(128, 256), eval_lengths=(128, 256, 512, 1024),
                     budgets=(0.25, 0.5), depths=(0.1, 0.5, 0.9), profile_batches=4,
                     eval_batches=2),
    "tiny": Settings(profile_lengths=(128,), eval_lengths=(128,), budgets=(0.5,),
                     depths=(0.5,), profile_batches=1, eval_batches=1),
}


def main(argv=None) -> int:
  from memx.errors import UserError
  from memx.experiment import report
  from memx.experiment.runner import RunSpec, run
  from memx.sparse import plan as plans
  from memx.sparse.evaluate import evaluate, write_evaluation
  from memx.sparse.profile import profile_model
  from memx.train.restore import load_trained

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="base", choices=VARIANTS)
  ap.add_argument("--workdir", default="runs")
  args = ap.parse_args(argv)
  s = SETTINGS[args.variant]
  sweep_dir = pathlib.Path(args.workdir) / ("moa" if args.variant == "base" else
                                            f"moa-{args.variant}")
  run_dir = sweep_dir / "dense"

  # 1. The dense model (resumes / skips when already trained).
  run(RunSpec(__file__, args.variant, {}, str(sweep_dir), "dense"), resume=True,
      progress=True)
  trained = load_trained(run_dir)
  cfg = trained.cfg

  # 2. Profile, 3. plans: MoA per budget and the baselines at the same budget.
  out = run_dir / "sparse"
  prof = profile_model(trained.model, cfg.data, s.profile_lengths, batches=s.profile_batches,
                       batch_size=2, block=16, meta={"run": str(run_dir)})
  prof.save(out / "profile.npz")
  candidates = {"dense": plans.dense_plan(cfg.model, s.profile_lengths)}
  for b in s.budgets:
    pct = round(100 * b)
    candidates[f"moa{pct}"] = plans.search_plan(prof, b, n_sink=s.n_sink)
    candidates[f"uniform{pct}"] = plans.uniform_plan(cfg.model, b, s.profile_lengths,
                                                     n_sink=s.n_sink)
    try:
      candidates[f"longgen{pct}"] = plans.longgen_plan(cfg.model, b, s.profile_lengths,
                                                       n_sink=s.n_sink)
    except UserError as e:  # LongGen's dense third does not fit a small budget: say so
      print(f"longgen{pct}: {e}")

  # 4. Evaluate every plan on the same data (no retraining).
  summary = {}
  for name, plan in candidates.items():
    plan.save(out / f"{name}.json")
    result = evaluate(trained.model, cfg.data, s.eval_lengths,
                      plan=None if name == "dense" else plan, depths=s.depths,
                      batches=s.eval_batches, batch_size=8)
    result["predicted_loss_increase"] = plans.predicted_loss(prof, plan)
    result["columns"]["predicted ΔL"] = result["predicted_loss_increase"]
    write_evaluation(run_dir, name, result)
    summary[name] = result["columns"] | {"passkey": result["passkey_mean"]}
    print(f"{name:10s} " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result["columns"].items()))
  (sweep_dir / "moa_summary.json").write_text(json.dumps(summary, indent=1))
  path = report.write_report(sweep_dir)
  print(f"report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
