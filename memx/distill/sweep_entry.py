"""Distillations as sweep entries: a student distilled from another entry's trained run.

A sweep entry whose overrides use `distill.*` keys is a distillation, not a training run:

  ("hybrid-distilled-d128", {"distill.from": "dense-d128", "distill.student": "hybrid:every=2",
                             "distill.stage1.steps": 40})

`distill.from` names an earlier entry of the same sweep (the teacher), `distill.student` is
`memx distill --student`'s value (default "hybrid"), and every other `distill.KEY` overrides
the DistillConfig (the experiment file's `distill_config(variant)` when it defines one, else
the defaults; data defaults to the teacher's, and `distill.data.KEY` overrides apply to the
teacher's data once its run exists: they are checked, on the teacher entry's data config, when
the sweep is planned). The sweep driver runs distillation entries after all training entries.
The stages go to SWEEP/NAME/distill/; the final student's config, metrics (every stage's, with
a stage column) and summary are copied to SWEEP/NAME so the report shows the student as one
more row. (Glue
between memx.experiment's sweeps and memx.distill: it imports both; memx.experiment's runner
and sweep import it lazily.)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from memx.errors import ConfigError

PREFIX = "distill."
FROM, STUDENT = "distill.from", "distill.student"


def build(module, variant: str | None, overrides: dict[str, Any], names_before: list[str],
          teacher_cfgs: dict | None = None):
  """(teacher entry name, DistillConfig, data overrides); checks everything.

  The data overrides are `distill.data.*` keys (without the prefix) still to be applied, when
  the DistillConfig's data is None (the teacher run's, resolved in `run`); else {} (applied).
  teacher_cfgs: entry name → Config, when known (the sweep's plan): the stages' data is then
  checked as the teacher's data with those overrides, before anything trains.
  """
  from memx.data.config import DataConfig
  from memx.distill.cli import parse_student
  from memx.distill.config import DistillConfig
  from memx.experiment.overrides import apply_overrides, check_overrides

  plain = [k for k in overrides if not k.startswith(PREFIX)]
  if plain:
    raise ConfigError(f"a distillation entry takes only distill.* keys; got {plain} (the student's "
                      "shape comes from the teacher; set stage options as distill.stageK.FIELD).")
  teacher = overrides.get(FROM)
  if not isinstance(teacher, str) or teacher not in names_before:
    raise ConfigError(f"{FROM} = {teacher!r} must name an earlier entry of the sweep (the "
                      f"teacher run); earlier entries: {names_before}.")
  fn = getattr(module, "distill_config", None)
  dcfg = (fn(variant) if variant is not None else fn()) if fn else DistillConfig()
  flags = parse_student(str(overrides.get(STUDENT, "hybrid")))
  flags |= {k[len(PREFIX):]: v for k, v in overrides.items() if k not in (FROM, STUDENT)}
  data = {k[len("data."):]: flags.pop(k) for k in list(flags) if k.startswith("data.")}
  if dcfg.data is not None:
    flags |= {f"data.{k}": v for k, v in data.items()}
    data = {}
  elif data:  # keys and types now; values meet the teacher's data config in `run`
    check_overrides(DataConfig(), data, prefix=PREFIX + "data.")
  dcfg = apply_overrides(dcfg, flags)
  if teacher_cfgs and teacher in teacher_cfgs:
    tcfg = teacher_cfgs[teacher]
    from memx.distill.runner import check_stage_data  # runner.plan's check, before training
    check_stage_data(dcfg.data or apply_overrides(tcfg.data, data), dcfg, tcfg.model)
  return teacher, dcfg, data


def run(spec, module, *, resume: bool, overwrite: bool, progress: bool) -> dict:
  """Distils SWEEP/<teacher> into SWEEP/<spec.name>; returns the final stage's summary."""
  from memx._io import atomic_file, write_json
  from memx.distill import runner
  from memx.experiment.overrides import apply_overrides
  from memx.train.metrics import read_metrics

  sweep_dir = pathlib.Path(spec.workdir)
  names = [n for n in _entry_names(module) if n != spec.name]
  teacher, dcfg, data = build(module, spec.variant, spec.overrides, names)
  teacher_dir = sweep_dir / teacher
  dcfg = runner.resolve_config(teacher_dir, dcfg)
  if data:
    dcfg = dataclasses.replace(dcfg, data=apply_overrides(dcfg.data, data))
  out = sweep_dir / spec.name
  stages_dir = out / "distill"
  # In progress: the entry's previous summary (and the files beside it) would read as this
  # run's result while it runs or if it fails, as `train` unlinks a run's own summary.
  for stale in ("summary.json", "config.json", "metrics.jsonl"):
    (out / stale).unlink(missing_ok=True)
  summaries = runner.distill(teacher_dir, dcfg, stages_dir, resume=resume, overwrite=overwrite,
                             progress=progress)
  last = stages_dir / f"stage{max(summaries)}"
  rows, offset = [], 0
  for k in sorted(summaries):  # one step axis across stages, so the loss plot reads left to right
    stage_rows = read_metrics(stages_dir / f"stage{k}" / "metrics.jsonl")
    rows += [{**r, "step": r["step"] + offset, "stage": k} for r in stage_rows]
    offset += max((r["step"] for r in stage_rows), default=0)
  # The stages' train "loss" is their objective (layer MSE, KL), not a language-model loss:
  # renamed, so the report's loss plot and "train loss" column do not set it beside the
  # cross-entropy of the trained entries.
  rows = [{("objective" if k == "loss" and r.get("split", "train") == "train" else k): v
           for k, v in r.items()} for r in rows]
  write_json(out / "config.json", json.loads((last / "config.json").read_text()))
  with atomic_file(out / "metrics.jsonl") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  final = summaries[max(summaries)]
  summary = {**final, "name": spec.name, "teacher": teacher, "student": dcfg.student.label,
             "stages": list(dcfg.stages), "final_train_loss": None,
             "final_objective": final.get("final_train_loss"),
             **_on_teacher_eval_rows(teacher_dir, last)}
  write_json(out / "summary.json", summary)  # last: its presence marks the entry finished
  return summary


def _on_teacher_eval_rows(teacher_dir: pathlib.Path, student_dir: pathlib.Path) -> dict:
  """The final student's evaluation on its teacher run's held-out rows (the teacher's eval
  loader and eval_batches), so that its eval loss and task accuracy compare with every trained
  entry's on the same data, and its teacher_loss equals the teacher's final_eval_loss."""
  from memx.distill.stages import evaluate
  from memx.train.loop import eval_loaders
  from memx.train.restore import load_trained

  t, s = load_trained(teacher_dir), load_trained(student_dir)
  lm, task = eval_loaders(t.cfg)
  layers = tuple(i for i in range(s.cfg.model.n_layers)
                 if s.cfg.model.mixer(i) != t.cfg.model.mixer(i))
  # The teacher run's rows, in the pieces that run evaluated them in.
  e = evaluate(s.model, t.model, {"lm": lm, "task": task, "batches": t.cfg.train.eval_batches},
               layers, t.cfg.train.microbatches)
  return {"final_eval_loss": e["loss"], "eval_perplexity": e["perplexity"],
          "task_accuracy": e.get("accuracy"),
          **{k: v for k, v in e.items() if k not in ("loss", "perplexity", "accuracy")}}


def _entry_names(module) -> list[str]:
  from memx.experiment import loading
  return [n for n, _ in loading.sweep_entries(module)]
