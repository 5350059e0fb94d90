"""MatMul-free LM vs Transformer at three sizes: train, then measure every memory claim exactly.

Command:   python experiments/matmulfree/pipeline.py [--variant tiny] [--workdir runs]
           (then `memx report runs/matmulfree` redraws the report)
Steps:     trains the sweep of compare.py (resuming finished runs), then for every trained run
           measures, on the trained weights: the training step's memory (the run's compiled
           step, and the activation bytes autodiff keeps for its backward pass), inference
           weight bytes (packed 2-bit vs bf16), decode state per sequence against a KV cache at
           1k–64k tokens, and greedy decode tokens/s (timed on the packed form for ternary
           runs and on the fp32 weights otherwise, while serving bytes count bf16). Each run
           gets RUN/evaluations/inference.json; the sweep gets matmulfree_summary.json and a
           report with the comparison table.
Hardware:  CPU, 2 cores: "base" ≈ 7 minutes (training is most of it), "tiny" ≈ 30 seconds.

Result (base): see benchmarks/RESULTS.md, "MatMul-free experiment", which states which of the
paper's claims the small-scale result supports.
"""

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
COMPARE = HERE / "compare.py"
LENGTHS = (1024, 4096, 16384, 65536)


def _saved_activation_bytes(model, cfg) -> int:
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from memx.train.memory import saved_activation_bytes

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.zeros((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return saved_activation_bytes(loss, params)


def measure(run_dir: pathlib.Path, *, decode_tokens: int, reps: int) -> dict:
  """The inference and training-memory columns of one trained run."""
  import jax
  from flax import nnx

  from memx.models.decode import cache_bytes, generate
  from memx.models.packed import pack_model
  from memx.timing import median_time
  from memx.train.restore import load_trained

  trained = load_trained(run_dir)
  cfg, model = trained.cfg, trained.model
  summary = json.loads((run_dir / "summary.json").read_text())
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ternary = cfg.model.uses_bitlinear and cfg.model.ternary
  serve = pack_model(nnx.clone(model)) if ternary else model
  # Served in bf16, except the packed form's 2-bit codes (uint8 bytes or int32 words of them)
  # and fp32 per-layer scales.
  codes = (jax.numpy.uint8, jax.numpy.int32)
  weight_bytes = sum(x.nbytes if x.dtype in codes or x.size == 1 else 2 * x.size
                     for x in jax.tree.leaves(nnx.state(serve)))
  state = [cache_bytes(jax.eval_shape(lambda n=n: model.init_cache(1, n))) for n in LENGTHS]
  prompt = jax.numpy.zeros((1, 16), jax.numpy.int32)
  seconds = median_time(lambda: generate(serve, prompt, decode_tokens), (), reps=reps)
  mem = summary.get("memory", {})
  return {
      "columns": {
          "eval loss": summary.get("final_eval_loss"),
          "params": int(n_params),
          "train step bytes (args+temp)": (mem.get("argument_bytes") or 0)
          + (mem.get("temp_bytes") or 0),
          "saved activation bytes": _saved_activation_bytes(model, cfg),
          "serving weight bytes": int(weight_bytes),
          "serving form": "2-bit packed + bf16" if ternary else "bf16",
          "decode state bytes @64k": state[-1],
          "decode tok/s": decode_tokens / seconds,
      },
      "curves": {"decode state bytes per sequence": {"x": list(LENGTHS), "y": state}},
  }


def claims(rows: dict[str, dict]) -> list[str]:
  """One line per size: MatMul-free against the Transformer of that size with the lower eval
  loss (of its two learning rates), as ratios."""
  lines = []
  for name, r in rows.items():
    if not name.startswith("matmulfree-"):
      continue
    size = name.removeprefix("matmulfree-")
    peers = [rows[k]["columns"] for k in (f"transformer-{size}", f"transformer-lr1e-3-{size}")
             if k in rows]
    if not peers:
      continue
    m, t = r["columns"], min(peers, key=lambda c: c["eval loss"])
    ratio = lambda k, m=m, t=t: m[k] / t[k] if m[k] and t[k] else float("nan")  # noqa: E731
    lines.append(
        f"{size}: eval loss {m['eval loss']:.4f} vs {t['eval loss']:.4f} "
        f"(gap {m['eval loss'] - t['eval loss']:+.4f}); train step memory ×"
        f"{ratio('train step bytes (args+temp)'):.2f}; saved activations ×"
        f"{ratio('saved activation bytes'):.2f}; serving weights ×"
        f"{ratio('serving weight bytes'):.2f} (vs bf16); decode state @64k ×"
        f"{ratio('decode state bytes @64k'):.2g}; decode tok/s ×{ratio('decode tok/s'):.2f}")
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
  sweep_dir = pathlib.Path(args.workdir) / ("matmulfree" if args.variant == "base" else
                                            f"matmulfree-{args.variant}")
  decode_tokens, reps = (64, 3) if args.variant == "base" else (8, 2)
  rows = {}
  for name, overrides in module.entries(args.variant):
    run_current(RunSpec(str(COMPARE), args.variant, overrides, str(sweep_dir), name))
    rows[name] = measure(sweep_dir / name, decode_tokens=decode_tokens, reps=reps)
    write_evaluation(sweep_dir / name, "inference", rows[name])
    print(f"{name:24s} " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in rows[name]["columns"].items()))
  lines = claims(rows)
  print("\n".join(lines))
  write_json(sweep_dir / "matmulfree_summary.json",
             {"runs": {k: v["columns"] for k, v in rows.items()}, "claims": lines}, indent=1)
  print(f"report: {report.write_report(sweep_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
