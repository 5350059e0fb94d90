"""Local learning ablation: end-to-end backprop against gradient-isolated block groups
(memx.train.local), on an 8-layer narrow LM over the embedded corpus, with the same steps and
tokens for every entry.

Command:   memx sweep experiments/local/ablation.py
One run:   memx run experiments/local/ablation.py --set local.groups=4 --set local.aux_depth=2
Hardware:  CPU, 2 cores; about 12 minutes for the sweep (8 runs of 300 steps).
Result:    (2026-11-28, CPU, commit ee4779d; benchmarks/RESULTS.md "Session 23") eval loss
           and compiled step temporaries: backprop 1.380, 159 MiB; backprop-remat 1.376, 37 MiB;
           local2-d1 1.385, 105 MiB; local4-d1-man 1.422, 65 MiB; local4-d2 1.492, 89 MiB;
           local4-probe 1.678, 53 MiB; local4-d1 1.728, 71 MiB; local8-probe 1.787, 36 MiB.
           A second seed (train.seed=1) moved backprop to 1.999 (a long early plateau) and the
           4-group runs to 1.534-1.634: the seed spread exceeds the differences between
           variants, so 300 steps do not rank them. Remat "full" keeps fewer temporaries
           (0.24x) with an unchanged gradient.

Entries: backprop; AugLocal with 2 and 4 groups (auxiliary depth 1, and 2 with its pyramid);
a linear probe per group (depth 0, DGL-like) at 4 and 8 groups; MAN (auxiliary blocks that are
moving averages of the layers they copy) at 4 groups; and backprop with remat "full", the
usual way to the same activation memory at no cost in quality (only in time).

What it does not show: local learning at scale. The papers' ~40% memory savings at matched
accuracy are for vision CNNs and ViTs trained to convergence; 300 steps of a small LM say what
the gradient isolation costs early in training, at what memory.
"""

import dataclasses

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  LocalConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)

VARIANTS = ("base", "tiny")

# run name → dotted overrides on config(variant)
SWEEP: list[tuple[str, dict]] = [
    ("backprop", {}),
    ("backprop-remat", {"model.remat": "full"}),
    ("local2-d1", {"local.groups": 2, "local.aux_depth": 1}),
    ("local4-d1", {"local.groups": 4, "local.aux_depth": 1}),
    ("local4-d2", {"local.groups": 4, "local.aux_depth": 2}),
    ("local4-probe", {"local.groups": 4, "local.aux_depth": 0}),
    ("local4-d1-man", {"local.groups": 4, "local.aux_depth": 1, "local.aux_weights": "ema"}),
    ("local8-probe", {"local.groups": 8, "local.aux_depth": 0}),
]


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=96, n_layers=8, n_heads=4, n_kv_heads=2),
      data=DataConfig(source="corpus", seq_len=128),
      optim=OptimConfig(lr=3e-3, warmup_steps=30),
      train=TrainConfig(steps=300, batch_size=16, log_every=10, eval_every=100,
                        eval_batches=4),
      local=LocalConfig(),
      checkpoint=CheckpointConfig(every=300, keep=1),
  )
  if variant == "tiny":  # the smoke test: seconds
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, d_model=32),
        data=dataclasses.replace(cfg.data, seq_len=32),
        train=dataclasses.replace(cfg.train, steps=4, batch_size=8, log_every=2, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=4))
  return cfg


def sweep() -> list[tuple[str, dict]]:
  return SWEEP
