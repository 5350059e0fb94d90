"""MatMul-free LM vs Transformer at equal width: ternary MLGRU + BitGLU against full precision.

Command:   memx sweep experiments/matmulfree/compare.py
One run:   memx run experiments/matmulfree/compare.py:base --set model.ternary=false
Hardware:  CPU, 2 cores; a few minutes for the sweep ("tiny": seconds).
Expected:  all runs start near ln(512) ≈ 6.2 nats. The ternary MatMul-free LM trails the
           Transformer at this tiny scale (Zhu et al. 2024 see the gap close only at >1B
           parameters); its full-precision twin (model.ternary=false) isolates the cost of
           quantization from that of replacing attention by the MLGRU. Decode state is
           2 · d_model · 4 bytes per layer and sequence, whatever the length.
"""

import dataclasses

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")

# run name → dotted overrides on config(variant).
SWEEP: list[tuple[str, dict]] = [
    ("transformer-d128", {}),
    ("matmulfree-d128", {"model.mixers": ("mlgru", "mlgru"), "model.mlp_kind": "bitglu"}),
    ("mlgru-fp-d128", {"model.mixers": ("mlgru", "mlgru"), "model.mlp_kind": "bitglu",
                       "model.ternary": False}),
    ("transformer-bitglu-d128", {"model.mlp_kind": "bitglu"}),
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
