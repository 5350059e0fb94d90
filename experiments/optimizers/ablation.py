"""Optimizer memory ablation: AdamW, Lion and Adafactor, and gradient accumulation, on the demo's
small LM (embedded corpus mixed with MQAR), with the same steps and tokens for every entry.

Command:   memx sweep experiments/optimizers/ablation.py
One run:   memx run experiments/optimizers/ablation.py:base --set optim.name=lion --set optim.lr=3e-4
Hardware:  CPU, 2 cores; about 5 minutes for the sweep.
Expected:  (filled in from a run, benchmarks/RESULTS.md "Session 18") the report's "opt state"
           column: AdamW 2 float32 moments per parameter, bf16 first moments 0.75 of that, Lion
           0.5, Adafactor under 1%; eval losses within a few hundredths of AdamW's at these
           tuned-by-convention learning rates (Lion 10x smaller, Adafactor's relative steps
           larger); adamw-mb4 equals adamw to float rounding with less temporary memory.

What it does not show: which optimizer is better at scale. 200 steps of a 2-layer model say
only that each trains at its usual learning rate and what its state costs.
"""

import dataclasses

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")

# run name → dotted overrides on config(variant)
SWEEP: list[tuple[str, dict]] = [
    ("adamw", {}),
    ("adamw-bf16mu", {"optim.mu_dtype": "bfloat16"}),
    ("lion", {"optim.name": "lion", "optim.lr": 3e-4}),
    ("adafactor", {"optim.name": "adafactor", "optim.lr": 1e-2}),
    # Gradient accumulation: the same batch in 4 pieces (same update, a quarter of the
    # activations at a time).
    ("adamw-mb4", {"train.microbatches": 4}),
]


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2),
      data=DataConfig(source="corpus", seq_len=128, task="mqar", task_fraction=0.25,
                      mqar_pairs=8),
      optim=OptimConfig(lr=3e-3, warmup_steps=30),
      train=TrainConfig(steps=200, batch_size=16, log_every=10, eval_every=100,
                        eval_batches=4),
      checkpoint=CheckpointConfig(every=200, keep=1),
  )
  if variant == "tiny":  # the smoke test: seconds
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, d_model=32),
        data=dataclasses.replace(cfg.data, seq_len=32, mqar_pairs=4),
        train=dataclasses.replace(cfg.train, steps=4, batch_size=32, log_every=2, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=4),
    )
  return cfg


def sweep() -> list[tuple[str, dict]]:
  return SWEEP
