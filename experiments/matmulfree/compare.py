"""MatMul-free LM vs Transformer at equal width: ternary MLGRU + BitGLU against full precision.

Command:   memx sweep experiments/matmulfree/compare.py     (training only)
           python experiments/matmulfree/pipeline.py        (training + memory/speed evaluation)
One run:   memx run experiments/matmulfree/compare.py:base --set model.ternary=false
Hardware:  CPU, 2 cores; about 7 minutes for the sweep ("tiny": seconds).
Sweep:     Transformer (at the shared lr and at 1e-3) and MatMul-free LM at d_model 64, 128
           and 192 (2 layers, equal token budgets: same steps, batch and length), plus two
           ablations at d 128: the MLGRU LM in full precision and a Transformer with the
           ternary BitGLU channel mixer.
Result (base, 2-core CPU, 2026-11-26; benchmarks/RESULTS.md, "MatMul-free experiment"):
           at this budget (150 steps × 16 × 128 tokens) the MatMul-free LM reaches a lower eval
           loss than the better-tuned Transformer at every size (1.84 vs 2.03, 1.54 vs 1.62,
           1.43 vs 1.57 nats/byte at d 64/128/192); ternary weights cost 0.06 nats against the
           full-precision MLGRU twin. Decode state is one fp32 [d_model] vector per layer and
           sequence (d_model · 4 bytes) plus a 4-byte position, whatever the length.
"""

import dataclasses

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")

MATMULFREE = {"model.mixers": ("mlgru", "mlgru"), "model.mlp_kind": "bitglu"}
SIZES = (64, 128, 192)

# run name → dotted overrides on config(variant). Sizes scale d_model only.
# The shared lr (3e-3) suits ternary training; each Transformer also runs at 1e-3, so the
# comparison is against the better-tuned of the two.
SWEEP: list[tuple[str, dict]] = [
    entry for d in SIZES for entry in (
        (f"transformer-d{d}", {"model.d_model": d}),
        (f"transformer-lr1e-3-d{d}", {"model.d_model": d, "optim.lr": 1e-3}),
        (f"matmulfree-d{d}", {"model.d_model": d, **MATMULFREE}))
] + [
    ("mlgru-fp-d128", {"model.d_model": 128, **MATMULFREE, "model.ternary": False}),
    ("transformer-bitglu-d128", {"model.d_model": 128, "model.mlp_kind": "bitglu"}),
]


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2),
      data=DataConfig(source="corpus", seq_len=128),
      # Ternary training wants a larger learning rate than full precision (BitNet b1.58 §3):
      # the latent weights must move by about mean|W| to change a code.
      optim=OptimConfig(lr=3e-3, warmup_steps=30),
      train=TrainConfig(steps=150, batch_size=16, log_every=10, eval_every=75, eval_batches=4),
      checkpoint=CheckpointConfig(every=150, keep=1),
  )
  if variant == "tiny":  # CPU smoke test: seconds, not minutes
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, d_model=32, n_heads=2, n_kv_heads=1),
        data=dataclasses.replace(cfg.data, seq_len=32),
        train=dataclasses.replace(cfg.train, steps=6, batch_size=8, log_every=2, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=3),
    )
  return cfg


def sweep() -> list[tuple[str, dict]]:
  return SWEEP


def entries(variant: str = "base") -> list[tuple[str, dict]]:
  """The sweep for a variant: "tiny" keeps its own width and only the smallest pair."""
  if variant == "tiny":
    return [(name, {k: v for k, v in o.items() if k != "model.d_model"}) for name, o in SWEEP
            if name in ("transformer-d64", "matmulfree-d64")]
  return SWEEP
