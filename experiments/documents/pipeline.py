"""Document masks, trained and evaluated both ways: what a row's earlier documents do to a model.

Command:   python experiments/documents/pipeline.py [--variant tiny] [--workdir runs]
           (then `memx report runs/documents` redraws the report)
Steps:     trains the sweep of compare.py (reusing finished runs), and the same four runs on
           the paragraphs in a random order ("-shuffled": neighbours from unrelated topics,
           written to SWEEP/data/shuffled.npy); then evaluates every trained model on its
           data's held-out rows two ways: "apart" (document masks: each paragraph alone) and
           "joined" (each row one sequence), over all tokens and over the tokens of later
           documents only (a row's first document reads the same either way; later ones are
           where the views differ). Each run gets RUN/evaluations/documents.json; the sweep
           gets documents_summary.json and a report.
Hardware:  CPU, 2 cores: "base" about 18 minutes (training is most of it), "tiny" a minute.

Result (base): benchmarks/RESULTS.md, "Document-mask experiment".
"""

import argparse
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
COMPARE = HERE / "compare.py"
VIEWS = ("apart", "joined")
EOS = 258  # the byte tokenizer's end of document


def write_shuffled(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """The corpus's paragraphs in a random order, byte tokens with EOS after each, as .npy: the
  same documents as `data.text_separator = "\n\n"`, with unrelated neighbours."""
  from memx._io import atomic_file
  from memx.data import load_corpus

  docs = [d for d in load_corpus()[0].split(b"\n\n") if d]
  order = np.random.default_rng(seed).permutation(len(docs))
  tokens = np.concatenate([np.append(np.frombuffer(docs[i], np.uint8).astype(np.int32), EOS)
                           for i in order])
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_file(path, "wb") as f:
    np.save(f, tokens)
  return path


def with_shuffled(entries: list[tuple[str, dict]], path: pathlib.Path) -> list[tuple[str, dict]]:
  """Each entry again on the shuffled paragraphs (its "-shuffled" twin)."""
  out = []
  for name, overrides in entries:
    data = {"data.source": "npy", "data.paths": (str(path),), "data.vocab_size": 261,
            "data.text_separator": None}
    if overrides.get("data.document_mask"):
      data["data.eos_id"] = EOS
    out.append((f"{name}-shuffled", {**overrides, **data}))
  return entries + out


def evaluate(run_dir: pathlib.Path, batches: int, batch_size: int) -> dict:
  """Mean loss of the run's model on `batches` eval rows of its data (document masks on: both
  arms of a family read the same rows), in both views, over all tokens and over
  later-document tokens."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from memx.data import make_loader
  from memx.train.loss import lm_token_losses
  from memx.train.restore import load_trained

  trained = load_trained(run_dir)
  graphdef, state = nnx.split(trained.model)
  data = trained.cfg.data
  data = dataclasses.replace(data, document_mask=True,
                             eos_id=EOS if data.source == "npy" else None)

  @jax.jit
  def losses(state, batch):
    return lm_token_losses(nnx.merge(graphdef, state), batch["inputs"], batch["targets"],
                           positions=batch.get("positions"),
                           segment_ids=batch.get("segment_ids"))

  loader = make_loader(data, batch_size=batch_size, seed=1234, split="eval")
  sums = {v: np.zeros(2) for v in VIEWS}
  later_sums = {v: np.zeros(2) for v in VIEWS}
  for k in range(batches):
    b = {key: jnp.asarray(x) for key, x in loader.local_batch(k).items()}
    later = np.asarray(b["segment_ids"] > b["segment_ids"][:, :1])
    for view in VIEWS:
      batch = b if view == "apart" else {key: b[key] for key in ("inputs", "targets")}
      tok = np.asarray(losses(state, batch))
      sums[view] += (tok.sum(), tok.size)
      later_sums[view] += (tok[later].sum(), later.sum())
  cols = {}
  for view in VIEWS:
    cols[f"eval loss, {view}"] = float(sums[view][0] / sums[view][1])
  for view in VIEWS:
    cols[f"later documents, {view}"] = float(later_sums[view][0] / max(later_sums[view][1], 1))
  cols["later-document tokens"] = int(later_sums["apart"][1])
  return {"columns": cols}


def claims(rows: dict) -> list[str]:
  """One line per model family: each arm in its own view and in the other."""
  lines = []
  for name in sorted(n for n in rows if "-plain" in n):
    family = name.replace("-plain", "")
    plain = rows[name]["columns"]
    masked = rows[name.replace("-plain", "-docmask")]["columns"]
    lines.append(
        f"{family}: later documents apart: docmask {masked['later documents, apart']:.4f} vs "
        f"plain {plain['later documents, apart']:.4f}; joined: docmask "
        f"{masked['later documents, joined']:.4f} vs plain {plain['later documents, joined']:.4f}"
        f"; all tokens apart {masked['eval loss, apart']:.4f} vs {plain['eval loss, apart']:.4f}"
        f", joined {masked['eval loss, joined']:.4f} vs {plain['eval loss, joined']:.4f}")
  return lines


def main(argv=None) -> int:
  from memx._io import write_json
  from memx.experiment import loading, report
  from memx.experiment.runner import RunSpec, run_current
  from memx.sparse.evaluate import write_evaluation

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="base", choices=("base", "tiny"))
  ap.add_argument("--workdir", default="runs")
  args = ap.parse_args(argv)
  module = loading.load_module(COMPARE)
  sweep_dir = pathlib.Path(args.workdir) / ("documents" if args.variant == "base" else
                                            f"documents-{args.variant}")
  base = module.config(args.variant)
  batches = 32 if args.variant == "base" else 2
  shuffled = write_shuffled(sweep_dir / "data" / "shuffled.npy")
  rows = {}
  for name, overrides in with_shuffled(module.entries(args.variant), shuffled.resolve()):
    run_current(RunSpec(str(COMPARE), args.variant, overrides, str(sweep_dir), name))
    rows[name] = evaluate(sweep_dir / name, batches, base.train.batch_size)
    write_evaluation(sweep_dir / name, "documents", rows[name])
    print(f"{name:22s} " + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in rows[name]["columns"].items()))
  lines = claims(rows)
  print("\n".join(lines))
  write_json(sweep_dir / "documents_summary.json",
             {"runs": {k: v["columns"] for k, v in rows.items()}, "claims": lines}, indent=1)
  print(f"report: {report.write_report(sweep_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
