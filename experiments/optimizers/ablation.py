"""Optimizer memory ablation: AdamW, Lion, Adafactor, GaLore, FRUGAL and APOLLO, FP8 moments,
and gradient accumulation, on the demo's small LM (embedded corpus mixed with MQAR), with the
same steps and tokens for every entry.

Command:   memx sweep experiments/optimizers/ablation.py
One run:   memx run experiments/optimizers/ablation.py --set optim.name=lion --set optim.lr=3e-4
Hardware:  CPU, 2 cores; about 9 minutes for the sweep (14 runs of 200 steps).
Result:    (2026-11-28, CPU; benchmarks/RESULTS.md "Session 18") eval loss and optimizer state:
           adamw 1.613, 3.5 MiB; adamw-bf16mu 1.614, 2.6 MiB; adafactor at lr 1e-2 2.107 and at
           3e-2 1.715, 32 KiB; lion at 3e-4 2.505 and at 1e-3 2.122, 1.8 MiB; adamw-mb4 1.613
           (equal to adamw to 1e-4 in train loss) with 18.4 MiB of temporaries against 65.2;
           galore-r32 1.746, 1.5 MiB (the embedding keeps Adam's moments); (2026-11-28, Session
           20) apollo-r32 1.601 and at lr 3e-3 1.814, 1.3 MiB; apollo-mini 1.985, 0.5 MiB;
           (Session 22, commit a99519a) adamw 1.6138, adamw-fp8 1.6140 (2.1 bytes of state
           per parameter against 8), adamw-fp8-plain 1.5819; frugal-r32 1.736 (lr 1e-3:
           1.862, 1e-2: 1.754), beside galore-r32's 1.747 with the same state.
           So the state shrinks exactly as counted; bf16 first moments cost nothing here;
           Adafactor nearly matches AdamW once its lr is raised; Lion at its usual 3-10x smaller
           lr lags after 200 steps; APOLLO at rank 32 matches AdamW with 0.38x its state.

What it does not show: which optimizer is better at scale. 200 steps of a 2-layer model say
only what each costs in state and how it starts at conventional learning rates.
"""

import dataclasses
import pathlib

from memx.config import Config
from memx.experiment.loading import load_module

# The demo's model and data (experiments/demo/ablation.py), trained twice as long.
DEMO = load_module(pathlib.Path(__file__).parents[1] / "demo" / "ablation.py")

VARIANTS = ("base", "tiny")

# run name → dotted overrides on config(variant)
SWEEP: list[tuple[str, dict]] = [
    ("adamw", {}),
    ("adamw-bf16mu", {"optim.mu_dtype": "bfloat16"}),
    # Lion with its paper's b2 = 0.99 (memx's default b2, 0.95, is AdamW's).
    ("lion", {"optim.name": "lion", "optim.lr": 3e-4, "optim.b2": 0.99}),
    ("lion-lr1e-3", {"optim.name": "lion", "optim.lr": 1e-3, "optim.b2": 0.99}),
    ("adafactor", {"optim.name": "adafactor", "optim.lr": 1e-2}),
    ("adafactor-lr3e-2", {"optim.name": "adafactor", "optim.lr": 3e-2}),
    # GaLore at rank 32 of the d 128 model's matrices, the projection refreshed every 50 steps.
    ("galore-r32", {"optim.name": "galore", "optim.galore_rank": 32, "optim.galore_every": 50,
                    "optim.lr": 1e-2}),
    # FRUGAL: GaLore's rank-32 subspace (unscaled) plus signSGD on the rest, at AdamW's lr.
    ("frugal-r32", {"optim.name": "frugal", "optim.galore_rank": 32, "optim.galore_every": 50}),
    # APOLLO at rank 32 (a quarter of d_model, as the paper sizes small models) at GaLore's lr
    # and at AdamW's, and APOLLO-Mini (rank 1, one scale per tensor, update x sqrt(128)); the
    # random projection is redrawn every 50 steps.
    ("apollo-r32", {"optim.name": "apollo", "optim.apollo_rank": 32, "optim.apollo_every": 50,
                    "optim.lr": 1e-2}),
    ("apollo-r32-lr3e-3", {"optim.name": "apollo", "optim.apollo_rank": 32,
                           "optim.apollo_every": 50}),
    ("apollo-mini", {"optim.name": "apollo_mini", "optim.apollo_every": 50, "optim.lr": 1e-2}),
    # COAT's FP8 moments (E4M3, group scales) with and without dynamic range expansion.
    ("adamw-fp8", {"optim.moment_quant": "fp8"}),
    ("adamw-fp8-plain", {"optim.moment_quant": "fp8_plain"}),
    # Gradient accumulation: the same batch in 4 pieces (same update, a quarter of the
    # activations at a time).
    ("adamw-mb4", {"train.microbatches": 4}),
]


def config(variant: str = "base") -> Config:
  cfg = DEMO.config(variant)
  if variant == "tiny":  # the smoke test: seconds (8 test devices x 4 microbatches: 32 rows)
    train = dataclasses.replace(cfg.train, steps=4, batch_size=32)
  else:
    train = dataclasses.replace(cfg.train, steps=200, eval_every=100)
  return dataclasses.replace(cfg, train=train, checkpoint=dataclasses.replace(
      cfg.checkpoint, every=train.steps))


def sweep() -> list[tuple[str, dict]]:
  return SWEEP
