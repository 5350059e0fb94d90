"""The `memx` command: run, sweep, report, eval, sparse (MoA plans), distill (attention →
Mamba-2), quantize (GPTQ), generate (optionally speculative)."""

import argparse
import importlib
import logging
import os
import sys

from memx.errors import CheckpointWriteError, NonFiniteLossError, Preempted, UserError

USAGE_EXAMPLES = """examples:
  memx run experiments/demo/ablation.py:tiny --set optim.lr=1e-3 --workdir runs
  memx sweep experiments/demo/ablation.py --workers 1
  memx report runs/ablation
  memx sparse profile runs/dense --lengths 256,512 --out profile.npz
  memx distill runs/dense --student hybrid:every=4 --stages 1,2,3
  memx generate runs/dense --prompt "Once upon" --draft runs/small --draft-len 4
  memx budget experiments/demo/ablation.py --activations --compare remat:model.remat=full"""

# Subcommands that live beside their package: each module has add_parser(subparsers), which
# registers its parser with set_defaults(handler=fn); fn(args) -> exit code imports lazily.
EXTENSIONS = ("memx.sparse.cli", "memx.distill.cli", "memx.quant.cli", "memx.models.cli",
              "memx.budget")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="memx", epilog=USAGE_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  r = sub.add_parser("run", help="train one experiment variant")
  r.add_argument("experiment", help="FILE[:VARIANT]")
  r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="dotted config override, repeatable (e.g. model.d_model=256)")
  r.add_argument("--workdir", default="runs")
  r.add_argument("--name", default=None,
                 help="run directory name (default: FILE-VARIANT, or FILE without :VARIANT)")
  r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
  r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
  r.add_argument("--plan", default=None, help="sparse-attention plan JSON (memx sparse search)")
  r.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port")
  r.add_argument("--num-processes", type=int, default=None)
  r.add_argument("--process-id", type=int, default=None)

  s = sub.add_parser("sweep", help="run every entry of an experiment's sweep() and report")
  s.add_argument("experiment", help="FILE[:VARIANT]")
  s.add_argument("--workdir", default="runs")
  s.add_argument("--workers", type=int, default=1)
  s.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local"])
  s.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                 help="submitit/SLURM parameter, e.g. slurm_partition=gpu, gpus_per_node=8")

  rep = sub.add_parser("report", help="write report.md and plots for a sweep directory")
  rep.add_argument("directory")
  for module in EXTENSIONS:
    importlib.import_module(module).add_parser(sub)
  return p


def _slurm_params(items):
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--slurm {item!r} is not of the form key=value.")
    out[key] = int(value) if value.isdigit() else value
  return out


def main(argv: list[str] | None = None) -> int:
  if "jax" not in sys.modules:  # a fresh process (not main() called from a running program)
    from memx._xla_flags import set_cpu_flags_if_multidevice
    set_cpu_flags_if_multidevice()  # collectives in one order on CPU devices
  args = _parser().parse_args(argv)
  logging.basicConfig(level=os.environ.get("MEMX_LOG", "WARNING"),
                      format="%(levelname)s %(name)s: %(message)s")
  try:
    if args.command == "run":
      return _cmd_run(args)
    if args.command == "sweep":
      return _cmd_sweep(args)
    if args.command == "report":
      return _cmd_report(args)
    return args.handler(args)
  except UserError as e:
    print(f"memx: error: {e}", file=sys.stderr)
    return 2
  except (NonFiniteLossError, CheckpointWriteError) as e:  # the run failed; advice, no trace
    print(f"memx: run failed: {e}", file=sys.stderr)
    return 1
  except Preempted as e:  # each host confirms its own save (a launcher prefixes its rank)
    print(f"memx: {e}", file=sys.stderr)
    return 143
  except KeyboardInterrupt:
    print("memx: interrupted; finished checkpoints and index rows are intact.", file=sys.stderr)
    return 130


def _cmd_run(args) -> int:
  from memx.experiment import loading
  from memx.experiment.overrides import parse_assignments
  from memx.experiment.runner import RunSpec, default_name, run
  from memx.parallel.mesh import maybe_initialize_distributed

  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  path, variant = loading.split_spec(args.experiment)
  spec = RunSpec(str(path), variant, parse_assignments(args.overrides), args.workdir,
                 args.name or default_name(str(path), variant), plan=args.plan)
  summary = run(spec, resume=args.resume, overwrite=args.overwrite)
  if _lead_process():  # one line per job, not per host
    print(f"run {spec.name}: {summary['status']} after {summary['steps']} steps; "
          f"eval loss {_fmt(summary['final_eval_loss'])}, task accuracy "
          f"{_fmt(summary['task_accuracy'])}, {_fmt(summary['tokens_per_s'], '.0f')} tokens/s")
    print(f"run directory: {os.path.join(args.workdir, spec.name)}")
  return 0


def _lead_process() -> bool:
  """Whether this process prints a job's outcome: process 0 of a multi-process job (every
  process reaches the same outcome), or the only one."""
  import jax
  return jax.process_index() == 0


def _cmd_sweep(args) -> int:
  from memx.experiment import loading, report
  from memx.experiment.sweep import run_sweep

  path, variant = loading.split_spec(args.experiment)
  sweep_dir = run_sweep(str(path), variant=variant, workdir=args.workdir, workers=args.workers,
                        executor=args.executor, slurm=_slurm_params(args.slurm))
  out = report.write_report(sweep_dir)
  print()
  print(report.summary_table(sweep_dir))
  print(f"\nreport: {out}")
  from memx.experiment.index import RunIndex
  # The runs of this sweep(): an entry since removed from it keeps its row, but is not retried.
  current = {name for name, _ in loading.sweep_entries(loading.load_module(path))}
  index = RunIndex(sweep_dir / "index.sqlite")
  failed = [r["name"] for r in index.rows() if r["status"] != "done" and r["name"] in current]
  index.close()
  if failed:
    print(f"memx: {len(failed)} run(s) did not finish: {', '.join(failed)} "
          "(errors in the report; run the sweep again to retry them)", file=sys.stderr)
    return 1
  return 0


def _cmd_report(args) -> int:
  from memx.experiment import report

  out = report.write_report(args.directory)
  print(report.summary_table(args.directory))
  print(f"\nreport: {out}")
  return 0


def _fmt(x, spec: str = ".4f") -> str:
  return "–" if x is None else format(x, spec)


if __name__ == "__main__":
  sys.exit(main())
