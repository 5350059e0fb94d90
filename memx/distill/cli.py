"""`memx distill TEACHER --student linear|hybrid[:every=4] [--stages 1,2,3]`.

Distils a trained memx Transformer (a run directory, its checkpoints/ folder or one
checkpoints/STEP) into a Mamba-2 ("linear") or hybrid student, stage by stage
(memx.distill.runner). Settings come from DistillConfig's defaults, or from an experiment file's
`distill_config(variant)` (`--experiment experiments/distill/pipeline.py:base`),
then the flags, then `--set key=value` overrides (e.g. `--set stage1.steps=500`,
`--set data.seq_len=256`; data defaults to the teacher run's).
"""

import argparse
import pathlib

from memx.errors import ConfigError, UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "distill", help="distil a trained Transformer into a Mamba-2 or hybrid student",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("teacher", help="teacher run directory, its checkpoints/ or checkpoints/STEP")
  p.add_argument("--student", default=None, metavar="linear|hybrid[:every=N]",
                 help="linear (the default): every attention layer becomes Mamba-2; hybrid "
                      "keeps attention at layers i %% N == 0 (default N = 4, mmMamba-hybrid)")
  p.add_argument("--stages", default=None, metavar="1,2,3",
                 help="stages to run (default: the config's, 1,2,3)")
  p.add_argument("--from-init", action="store_true",
                 help="start the first listed stage from the initial student, not from the "
                      "previous stage's checkpoint (ablation: --stages 2,3 --from-init)")
  p.add_argument("--init", choices=("seed", "random"), default=None,
                 help="seed the converted mixers from attention (default) or keep Mamba-2's "
                      "random initialisation (ablation)")
  p.add_argument("--experiment", default=None, metavar="FILE[:VARIANT]",
                 help="experiment file whose distill_config(variant) returns a DistillConfig")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="dotted DistillConfig override, repeatable (e.g. stage1.steps=500)")
  p.add_argument("--step", type=int, default=None, help="teacher checkpoint step (default: "
                 "the newest complete one)")
  p.add_argument("--out", default=None,
                 help="distillation directory (default: WORKDIR/<teacher>-distill-<student>)")
  p.add_argument("--workdir", default="runs")
  p.add_argument("--resume", action="store_true",
                 help="continue interrupted stages and keep finished ones")
  p.add_argument("--overwrite", action="store_true", help="replace the listed stages' directories")
  p.set_defaults(handler=handle)
  return p


def parse_student(spec: str) -> dict[str, object]:
  """"linear" | "hybrid" | "hybrid:every=N" → DistillConfig overrides."""
  kind, _, opts = spec.partition(":")
  if kind not in ("linear", "hybrid"):
    raise ConfigError(f"--student {spec!r} is not allowed: expected linear, hybrid or "
                      "hybrid:every=N (e.g. hybrid:every=4).")
  out: dict[str, object] = {"student.kind": kind}
  for item in filter(None, opts.split(",")):
    key, sep, value = item.partition("=")
    if kind != "hybrid" or key != "every" or not sep or not value.isdigit():
      raise ConfigError(f"--student {spec!r} is not allowed: only hybrid takes an option, "
                        "every=N with N an integer >= 2 (attention kept at layers i % N == 0).")
    out["student.every"] = int(value)
  return out


def build_config(args):
  """The DistillConfig from --experiment, the flags and --set (data resolved to the teacher's)."""
  from memx.distill.config import DistillConfig
  from memx.distill.runner import resolve_config, teacher_spec
  from memx.experiment import loading
  from memx.experiment.overrides import apply_overrides, parse_assignments

  if args.experiment:
    path, variant = loading.split_spec(args.experiment)
    module = loading.load_module(path)
    if variant is not None and variant not in loading.variants(module):
      raise UserError(f"unknown variant {variant!r} of {path}; choose one of "
                      f"{', '.join(loading.variants(module)) or '(none)'}.")
    # An experiment that also trains its teacher has config() for that run and
    # distill_config() for the distillation; a distillation-only file has config().
    fn = getattr(module, "distill_config", None) or module.config
    dcfg = fn(variant) if variant is not None else fn()
    if not isinstance(dcfg, DistillConfig):
      raise UserError(f"{path}: {fn.__name__}({variant!r}) returned {type(dcfg).__name__}; "
                      "memx distill needs a memx.distill.config.DistillConfig (define "
                      "distill_config(variant)).")
  else:
    dcfg = DistillConfig()
  flags = {} if args.student is None else parse_student(args.student)
  if args.stages is not None:
    flags["stages"] = args.stages
  if args.from_init:
    flags["from_init"] = True
  if args.init is not None:
    flags["student.init"] = args.init
  dcfg = apply_overrides(dcfg, flags)
  dcfg = resolve_config(teacher_spec(args.teacher)[0], dcfg)
  return apply_overrides(dcfg, parse_assignments(args.overrides))


def handle(args) -> int:
  from memx.distill import runner
  from memx.train.restore import find_run_dir

  if args.resume and args.overwrite:
    raise UserError("--resume and --overwrite exclude each other: continue the stages, or "
                    "start them over.")
  dcfg = build_config(args)
  if args.out is not None:
    out = pathlib.Path(args.out)
  else:
    teacher_dir = find_run_dir(runner.teacher_spec(args.teacher)[0])
    out = pathlib.Path(args.workdir) / f"{teacher_dir.name}-distill-{dcfg.student.label}"
  p = runner.plan(args.teacher, dcfg, out, teacher_step=args.step, resume=args.resume,
                  overwrite=args.overwrite)
  print(f"distilling {p.teacher.run_dir} (step {p.teacher.step}) into a {dcfg.student.label} "
        f"student: layers {list(p.layers)} become Mamba-2; stages {list(dcfg.stages)} → {out}")
  summaries = runner.execute(p)
  last = max(summaries)
  print(f"student: {out / f'stage{last}'} (a memx run directory: load it with "
        "memx.train.restore.load_trained)")
  return 0
