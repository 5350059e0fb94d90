"""Document masks: train on rows that span documents as one sequence, or as the documents apart?

Command:   memx sweep experiments/documents/compare.py        (training only)
           python experiments/documents/pipeline.py           (training + both evaluations)
One run:   memx run experiments/documents/compare.py:base --set data.document_mask=true
Hardware:  CPU, 2 cores; a few minutes ("tiny": seconds).
Data:      the embedded corpus split into its paragraphs (`data.text_separator = "\n\n"`, each
           paragraph a document ending in EOS; median about 110 bytes), rows of 256 bytes, so a
           row holds several documents. Both arms see the same token stream and the same rows;
           only `data.document_mask` differs.
Sweep:     a Transformer and a Mamba-2 LM (4 layers, d 128), each trained plain (a row is one
           sequence: later paragraphs attend to, or carry state from, earlier unrelated ones)
           and with document masks (each paragraph alone, positions from 0).
Result (base, 2-core CPU, 2026-11-27, one seed; benchmarks/RESULTS.md, "Document-mask
           experiment"): the Transformer trained and read with document masks beats the plain
           one's better view by 0.025 nats/byte (1.7228 vs 1.7481; 0.032 on later paragraphs);
           Mamba-2 gains nothing (1.2784 vs 1.2761). Each masked model reads worse joined.
           With the paragraphs shuffled (pipeline.py's "-shuffled" runs: unrelated
           neighbours) the Transformer's gain is 0.150 (2.0476 vs 2.1973); Mamba-2's is none.
"""

import dataclasses

from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("base", "tiny")
MAMBA = {"model.mixers": ("mamba2",) * 4}
MASK = {"data.document_mask": True}

SWEEP: list[tuple[str, dict]] = [
    ("transformer-plain", {}),
    ("transformer-docmask", MASK),
    ("mamba2-plain", MAMBA),
    ("mamba2-docmask", {**MAMBA, **MASK}),
]


def config(variant: str = "base") -> Config:
  cfg = Config(
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
      data=DataConfig(source="corpus", seq_len=256, text_separator="\n\n"),
      optim=OptimConfig(lr=3e-3, warmup_steps=20),
      train=TrainConfig(steps=200, batch_size=8, log_every=10, eval_every=100, eval_batches=8),
      checkpoint=CheckpointConfig(every=200, keep=1),
  )
  if variant == "tiny":  # CPU smoke test: seconds, not minutes
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, d_model=32, n_layers=2),
        data=dataclasses.replace(cfg.data, seq_len=64),
        train=dataclasses.replace(cfg.train, steps=4, log_every=2, eval_every=0, eval_batches=2),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=4),
    )
  return cfg


def sweep() -> list[tuple[str, dict]]:
  return SWEEP


def entries(variant: str = "base") -> list[tuple[str, dict]]:
  """The sweep for a variant: "tiny" has 2 layers, so its Mamba-2 lists 2 mixers."""
  if variant == "tiny":
    return [(n, {**o, "model.mixers": ("mamba2",) * 2} if "model.mixers" in o else o)
            for n, o in SWEEP]
  return SWEEP
