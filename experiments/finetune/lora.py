"""Fine-tuning ablation: full fine-tuning vs LoRA vs QLoRA on the same base model, same steps
and tokens, side by side with what those steps give from scratch.

The base ("base") is the demo's dense LM (d128, 2 layers, GQA 4/2 heads) pre-trained on the
embedded corpus alone for 200 steps. Every other entry fine-tunes it ("finetune.base": "@base":
the sweep runs them after it) for another 200 steps on the corpus mixed half and half with
passkey retrieval, a skill the base never saw, and is evaluated on the held-out corpus (eval
loss) and on passkey rows alone (accuracy of the 5 digits). LoRA's adapters sit on all seven
projections of each block unless the entry says otherwise (lora-r8-qv: the original LoRA
paper's wq, wv only); QLoRA adds NF4 bases.

Command:   memx sweep experiments/finetune/lora.py
One run:   memx run experiments/finetune/lora.py --name lora-r4 --set finetune.base=runs/lora/base \
             --set finetune.lora_rank=4
Hardware:  CPU, 2 cores; about 9 minutes for the sweep.
Result:    (2026-11-28, commit efa1e60; benchmarks/RESULTS.md "Session 21") corpus eval loss:
           base 1.465, full 1.387, LoRA r8 1.483 (38.9k trainable of 459k, 0.09x the optimizer
           state), r32 1.473, r8 on wq/wv only 1.531, QLoRA r8 1.483 and r32 1.472 (NF4 bases:
           the step's arguments 2.3x smaller than LoRA's), from scratch 1.909; at lr 1e-2
           (commit 4433b88) LoRA r8 1.457 and QLoRA r32 1.431. QLoRA matches LoRA at equal
           rank, adapters want the larger lr, no entry learns the passkey in 200 steps.

What it does not show: LoRA's quality at scale (a 0.5M-parameter model has little to adapt
with), nor QLoRA's speed (on CPU its matmul dequantizes in software).
"""

import dataclasses

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")

FT = {"finetune.base": "@base", "data.task": "passkey", "data.task_fraction": 0.5,
      "optim.warmup_steps": 10}
# run name → dotted overrides on config(variant)
SWEEP: list[tuple[str, dict]] = [
    ("base", {}),
    # The fine-tuning data and steps without the base: what the base is worth.
    ("scratch", {**FT, "finetune.base": None}),
    ("full", {**FT, "optim.lr": 1e-3}),
    ("lora-r8", {**FT, "finetune.lora_rank": 8}),
    ("lora-r32", {**FT, "finetune.lora_rank": 32}),
    ("lora-r8-qv", {**FT, "finetune.lora_rank": 8, "finetune.lora_targets": ("wq", "wv")}),
    ("qlora-r8", {**FT, "finetune.lora_rank": 8, "finetune.quantize_base": "nf4"}),
    ("qlora-r32", {**FT, "finetune.lora_rank": 32, "finetune.quantize_base": "nf4"}),
    # Adapters are usually trained at a larger lr than full fine-tuning: does it close the gap?
    ("lora-r8-lr1e-2", {**FT, "finetune.lora_rank": 8, "optim.lr": 1e-2}),
    ("qlora-r32-lr1e-2", {**FT, "finetune.lora_rank": 32, "finetune.quantize_base": "nf4",
                          "optim.lr": 1e-2}),
]


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2),
      data=DataConfig(source="corpus", seq_len=128),
      optim=OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.0),
      train=TrainConfig(steps=200, batch_size=16, log_every=10, eval_every=50, eval_batches=4),
      checkpoint=CheckpointConfig(every=200, keep=1),
  )
  if variant == "tiny":  # CPU smoke test: seconds, not minutes
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, d_model=64),
        train=dataclasses.replace(cfg.train, steps=4, batch_size=8, log_every=2, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=4),
    )
  return cfg


def sweep() -> list[tuple[str, dict]]:
  return SWEEP
