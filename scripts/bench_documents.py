"""Benchmark what document masks cost a training step (`data.document_mask`).

Documents: the paragraphs of CPython's pydoc topics (the embedded corpus), byte tokens with
EOS after each, so rows hold several documents of natural, uneven lengths (settings give the
length statistics). For each model family, one process
compiles the train step twice on the same rows, without and with document masks, and times
both alternately (the bare AOT step, as bench_train's "bare"): step time, tokens/s and compiled
temporary memory, with the masked/plain ratio. On CPU the masks cost the segment compares and
the SSD's run-aware chunks; on GPU they also move attention from cuDNN (no segment ids there)
to memx's Pallas kernel.

  python scripts/bench_documents.py --out benchmarks/out/documents            # CPU sizes
  python scripts/bench_documents.py --out $OUT/documents --size gpu           # bf16
"""

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from memx.benchmark import compile_train_step, time_steps, write_results
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.models.config import SSMConfig
from memx.train.memory import compiled_memory

# size → (d_model, n_layers, n_heads, seq_len, batch, steps per timing)
SIZES = {"cpu": (128, 4, 4, 1024, 4, 3), "gpu": (1024, 8, 8, 4096, 4, 10),
         "tiny": (32, 4, 2, 64, 8, 1)}  # tiny: the script's test (8 fake devices)
EOS = 258  # the byte tokenizer's end of document
MIXERS = {"transformer": None, "mamba2": ("mamba2",),
          "hybrid": ("mamba2", "mamba2", "mamba2", "attention")}


def write_documents(path: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """The pydoc topics' paragraphs as documents: byte tokens, EOS (258) after each, in one .npy
  file; and their length statistics."""
  from pydoc_data.topics import topics

  docs = [para.strip().encode("utf-8") for key in sorted(topics)
          for para in topics[key].split("\n\n") if para.strip()]
  tokens = np.concatenate([np.append(np.frombuffer(d, np.uint8).astype(np.int32), EOS)
                           for d in docs])
  np.save(path, tokens)
  lengths = np.array([len(d) + 1 for d in docs])
  return path, {"documents": len(docs), "doc_tokens_median": int(np.median(lengths)),
                "doc_tokens_mean": round(float(lengths.mean()), 1),
                "doc_tokens_p90": int(np.percentile(lengths, 90))}


def make_config(family: str, size: str, path: pathlib.Path, document_mask: bool) -> Config:
  d, layers, heads, seq, batch, steps = SIZES[size]
  mixers = MIXERS[family]
  if mixers is not None:
    mixers = (mixers * layers)[:layers]
  return Config(
      model=ModelConfig(vocab_size=512, d_model=d, n_layers=layers, n_heads=heads, mixers=mixers,
                        compute_dtype="bfloat16" if size == "gpu" else "float32",
                        ssm=SSMConfig(head_dim=min(64, d), d_state=64 if size == "gpu" else 32,
                                      chunk_size=min(64, seq))),
      data=DataConfig(source="npy", paths=(str(path),), seq_len=seq, vocab_size=261,
                      document_mask=document_mask, eos_id=EOS if document_mask else None),
      optim=OptimConfig(warmup_steps=2),
      train=TrainConfig(steps=steps, batch_size=batch, log_every=steps, eval_batches=1),
      checkpoint=CheckpointConfig(enabled=False))


def measure(family: str, size: str, path: pathlib.Path, repeats: int) -> list[dict]:
  runs = {}
  for masked in (False, True):
    cfg = make_config(family, size, path, masked)
    runs[masked] = [cfg, *compile_train_step(cfg)]
  times = {False: [], True: []}
  for _ in range(repeats):  # alternating, so machine noise hits both alike
    for masked, run in runs.items():
      cfg, compiled, state, batch = run
      t, run[2] = time_steps(compiled, state, batch, cfg.train.steps)
      times[masked].append(t)
  seg = np.asarray(runs[True][3]["segment_ids"])
  docs = float(np.mean(seg.max(axis=1) - seg.min(axis=1) + 1))
  rows = []
  for masked in (False, True):
    cfg, compiled = runs[masked][:2]
    t = statistics.median(times[masked])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    rows.append({"model": family, "document_mask": masked, "docs_per_row": round(docs, 2),
                 "step_ms": 1e3 * t, "tokens_per_s": tokens / t,
                 "temp_MiB": compiled_memory(compiled)["temp_bytes"] / 2**20})
  base = rows[0]
  for r in rows:
    r["time_x_plain"] = r["step_ms"] / base["step_ms"]
    r["temp_x_plain"] = r["temp_MiB"] / base["temp_MiB"]
  return rows


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/out/documents")
  p.add_argument("--size", default="cpu", choices=sorted(SIZES))
  p.add_argument("--models", default=",".join(MIXERS), help="comma-separated: " + ",".join(MIXERS))
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  families = args.models.split(",")
  unknown = sorted(set(families) - set(MIXERS))
  if unknown or args.repeats < 1:
    p.error(f"unknown --models {unknown} (allowed: {', '.join(MIXERS)}), or --repeats < 1")
  sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  d, layers, heads, seq, batch, steps = SIZES[args.size]
  settings = {"commit": sha, "size": args.size, "d_model": d, "n_layers": layers,
              "n_heads": heads, "seq_len": seq, "batch": batch, "steps_per_timing": steps,
              "repeats": args.repeats}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path, stats = write_documents(pathlib.Path(tmp) / "documents.npy")
    settings |= stats
    for family in families:
      rows += measure(family, args.size, path, args.repeats)
      # After every model: a time limit keeps the rows that finished.
      md = write_results(args.out, "bench_documents", settings, rows)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
