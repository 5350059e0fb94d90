"""Speculative decoding with small drafts: how many tokens each target pass yields, and what
that buys in wall-clock time, for a trained byte-level target and drafts trained on the same
data (a 1-layer Transformer, a 2-layer Mamba-2, and the target itself as the ceiling), and the same
drafts distilled from the target (DistillSpec: teacher.run, memx.train.kd).

Command:   python experiments/speculative/pipeline.py [--variant tiny] [--workdir runs]
Steps:     memx run (this file) for the target and each draft (cached: a finished run is
           reused), then greedy and sampled decoding of held-out corpus prompts, every row
           checked against plain `generate` (greedy: the same tokens).
Hardware:  CPU, 2 cores: "base" ≈ 22 minutes (training 18), "tiny" ≈ 1 minute.
Result:    (2026-11-28, commit df72a46; benchmarks/RESULTS.md "Session 22") at k = 4, greedy:
           the 1-layer Transformer draft keeps 63% of its tokens (3.52 tokens per target
           pass), the Mamba-2 draft 71% (3.84); at T = 1, 40% and 54%. Wall-clock on the CPU:
           1.2-1.26x (a small target's step is mostly fixed cost there). (Session 23, commit
           d9a1fad) the same drafts distilled from the target by forward KL keep more of their
           sampled tokens: at T = 1 and k = 4, 49% (1-layer) and 57% (Mamba-2); greedy
           acceptance moves little (65%, 71%). TVD alone (weight 1) does worse than the data
           (Mamba-2: 49% at T = 1, 66% greedy). On-policy rows (GKD, commit 740a0d3) match
           off-policy forward KL within 0.01 (57% at T = 1, 72% greedy).

Writes runs/speculative/speculative.json: per draft and draft length k, the acceptance (drafted
tokens kept), tokens per target pass, and the median seconds of a 128-token generation against
plain decoding measured in alternation (batch 1: the case speculative decoding is for).

What it does not show: GPU speed (there the target's weight reads dominate a decode step and
checking k + 1 tokens costs about one step: scripts/bench_speculative.py measures the parts),
nor drafts at LLM scale.
"""

import argparse
import dataclasses
import pathlib
import sys

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  TeacherConfig,
  TrainConfig,
)

SIZES = ("base", "tiny")
MODELS = {  # name → model config; all over the byte vocabulary (264 ids)
    "target": ModelConfig(vocab_size=264, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2),
    "draft_attention": ModelConfig(vocab_size=264, d_model=64, n_layers=1, n_heads=2),
    "draft_mamba": ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2,
                               mixers=("mamba2", "mamba2"), mlp=False),
}
# DistillSpec: the same drafts trained on the target's distribution instead of the data's
# (teacher.weight 1: the divergence alone), by forward KL and by total variation distance, and
# on-policy (GKD): half of each batch's rows continue the first 64 bytes with the draft's own
# samples, where the target's distribution is then taken.
DISTILLED = {"draft_mamba_kd_fkl": ("draft_mamba", {"divergence": "forward_kl"}),
             "draft_mamba_kd_tvd": ("draft_mamba", {"divergence": "tvd"}),
             "draft_attention_kd_fkl": ("draft_attention", {"divergence": "forward_kl"}),
             "draft_mamba_gkd_fkl": ("draft_mamba", {"divergence": "forward_kl",
                                                     "on_policy": 0.5, "prompt_len": 64})}
NAMES = (*MODELS, *DISTILLED)
VARIANTS = (*NAMES, *(f"{m}_tiny" for m in NAMES))  # what `memx run` accepts
DRAFT_LENS = (2, 4, 6)
PROMPT, NEW = 64, 128


def config(variant: str = "target") -> Config:
  """variant: a MODELS or DISTILLED name, optionally with "_tiny" (the smoke test's sizes and
  steps). A distilled draft's teacher is the target run under runs/ (the pipeline passes its
  own workdir's)."""
  name, tiny = variant.removesuffix("_tiny"), variant.endswith("_tiny")
  if name not in NAMES:
    raise ValueError(f"variant {variant!r}: expected one of {list(NAMES)} (+ '_tiny')")
  teacher = TeacherConfig()
  if name in DISTILLED:
    name, fields = DISTILLED[name]
    target_dir = pathlib.Path("runs") / ("speculative-tiny" if tiny else "speculative") / "target"
    if tiny and "prompt_len" in fields:
      fields = {**fields, "prompt_len": 112}  # (the smoke test samples 17 tokens)
    teacher = TeacherConfig(run=str(target_dir), weight=1.0, **fields)
  cfg = Config(
      teacher=teacher,
      model=MODELS[name],
      data=DataConfig(source="corpus", seq_len=128),
      optim=OptimConfig(lr=3e-3, warmup_steps=50),
      train=TrainConfig(steps=800, batch_size=16, log_every=100, eval_every=400, eval_batches=4),
      checkpoint=CheckpointConfig(every=400, keep=1),
  )
  if tiny:
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, d_model=min(cfg.model.d_model, 64),
                                       n_heads=2, n_kv_heads=None),
        train=dataclasses.replace(cfg.train, steps=8, batch_size=8, log_every=4, eval_every=0,
                                  eval_batches=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=8))
  return cfg


def measure(target, drafts: dict, prompts, *, new: int, draft_lens, repeats: int) -> dict:
  """Per draft and k: acceptance and tokens per pass over every prompt (greedy and at
  temperature 1), each greedy row checked against `generate`; the median seconds of one
  prompt's generation with and without the draft, timed in alternation."""
  import jax
  import numpy as np

  from memx.models.decode import generate
  from memx.models.speculative import speculative_generate
  from memx.timing import interleaved_medians

  rows = [p[None] for p in prompts]
  plain = [generate(target, r, new) for r in rows]
  out = {"prompts": len(rows), "prompt_len": int(rows[0].shape[1]), "new_tokens": new,
         "runs": []}
  for name, draft in drafts.items():
    for k in draft_lens:
      rec = {"draft": name, "k": k}
      for temp in (0.0, 1.0):
        stats = []
        for i, r in enumerate(rows):
          toks, s = speculative_generate(target, draft, r, new, draft_len=k, temperature=temp,
                                         rng=jax.random.key(i))
          if temp == 0.0 and not np.array_equal(np.asarray(toks), np.asarray(plain[i])):
            raise AssertionError(f"{name}, k={k}: greedy tokens differ from generate's")
          stats.append(s)
        acc = sum(s.accepted for s in stats) / sum(s.drafted for s in stats)
        per_pass = sum(s.accepted + s.rounds for s in stats) / sum(s.rounds for s in stats)
        key = "greedy" if temp == 0.0 else "t1"
        rec[f"{key}_acceptance"], rec[f"{key}_tokens_per_pass"] = acc, per_pass
      t_plain, t_spec = interleaved_medians(
          [lambda r: generate(target, r, new),
           lambda r, d=draft, k=k: speculative_generate(target, d, r, new, draft_len=k)[0]],
          (rows[0],), repeats)
      rec.update(plain_s=t_plain, speculative_s=t_spec, speedup=t_plain / t_spec)
      out["runs"].append(rec)
      print(f"{name:<16} k={k}  greedy: acceptance {rec['greedy_acceptance']:.2f}, "
            f"{rec['greedy_tokens_per_pass']:.2f} tokens/pass; T=1: "
            f"{rec['t1_acceptance']:.2f}, {rec['t1_tokens_per_pass']:.2f}; "
            f"{t_plain * 1e3:.1f} ms → {t_spec * 1e3:.1f} ms ({rec['speedup']:.2f}×)",
            flush=True)
  return out


def main(argv=None) -> int:
  import numpy as np

  from memx._io import write_json
  from memx.data import make_loader
  from memx.experiment.runner import RunSpec, run_current
  from memx.train.restore import load_trained

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="base", choices=SIZES)
  ap.add_argument("--workdir", default="runs")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  tiny = args.variant == "tiny"
  sweep_dir = pathlib.Path(args.workdir) / ("speculative-tiny" if tiny else "speculative")
  models = {}
  for name in NAMES:  # the target first: the distilled drafts learn from it
    variant = f"{name}_tiny" if tiny else name
    overrides = {"teacher.run": str(sweep_dir / "target")} if name in DISTILLED else {}
    run_current(RunSpec(__file__, variant, overrides, str(sweep_dir), name))
    models[name] = load_trained(sweep_dir / name).model
  target = models.pop("target")
  data = config("target").data
  loader = make_loader(data, batch_size=args.prompts, seed=1, split="eval")
  prompts = np.asarray(loader.local_batch(0)["inputs"])[:, :PROMPT]
  drafts = {**models, "self (ceiling)": target}
  result = measure(target, drafts, list(prompts), new=16 if tiny else NEW,
                   draft_lens=(2,) if tiny else DRAFT_LENS, repeats=2 if tiny else args.repeats)
  write_json(sweep_dir / "speculative.json", result)
  print(f"wrote {sweep_dir / 'speculative.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
