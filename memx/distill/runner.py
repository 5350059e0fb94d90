"""A whole distillation: check everything, calibrate and seed the student, run the stages.

Layout of a distillation directory OUT:
  distill.json   the resolved DistillConfig, the teacher (run directory, step), the student's
                 ModelConfig, the converted layers and the seeding calibration
  stage1/ stage2/ stage3/   one directory per stage (memx.distill.stages), each loadable as a
                 memx run by `memx.train.restore.load_trained`; the last one is the student

Where a stage starts: stage 1 from the initial (seeded, or random) student; a later stage from
the final student of the stage listed before it in this invocation, or, when it is the first
one listed, from OUT/stage{k-1} of an earlier invocation (missing → UserError before anything
runs) unless `from_init` asks for the initial student (the "skip stage 1" ablation).
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np

from memx._io import write_json
from memx.checkpoint import step_digest
from memx.config import to_dict
from memx.data import check_training_mix, make_loader
from memx.data.documents import check_model
from memx.distill.capture import calibrate
from memx.distill.config import DistillConfig
from memx.distill.seed import build_student, check_mapping, converted_layers, student_model_config
from memx.distill.stages import StageRun, run_stage, stage_run_config, to_device
from memx.errors import ConfigError, UserError
from memx.nn.lora import merge_lora
from memx.quant.model import dequantize_model
from memx.train.restore import Trained, load_config, load_trained

INIT = "init"


@dataclasses.dataclass
class Plan:
  """A checked distillation, ready to run."""

  teacher: Trained
  dcfg: DistillConfig             # data resolved
  student_model: object           # ModelConfig
  layers: tuple[int, ...]
  out: pathlib.Path
  runs: list[StageRun]
  sources: dict[int, object]      # stage → INIT or the directory it starts from
  resume: bool
  overwrite: bool


def _seed_for(seed: int, *parts: int) -> int:
  return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] % (2**31 - 1))


def _json(obj):
  return json.loads(json.dumps(obj, default=str))


def teacher_spec(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """A run directory, its checkpoints/ folder or checkpoints/STEP → (path, step or None)."""
  p = pathlib.Path(path)
  if p.name.isdigit() and p.parent.name == "checkpoints":
    return p, int(p.name)
  return p, None


def check_stage_data(data, dcfg: DistillConfig, model) -> None:
  """UserError unless every stage can train `model` (the student's or teacher's config: same
  vocabulary and attention masks) on `data` (its batch, task rows, vocabulary, documents)."""
  vocab_size = model.vocab_size
  check_model(data, model)
  for k in dcfg.stages:
    b = dcfg.stage(k).batch_size
    check_training_mix(data, b)
    loader = make_loader(data, batch_size=b, seed=0, split="train")
    if vocab_size < loader.vocab_size:
      raise ConfigError(f"distill.data gives {loader.vocab_size} token ids but the teacher's "
                        f"model.vocab_size is {vocab_size}; distil on data the teacher was "
                        "trained for.")


def resolve_config(teacher: str | pathlib.Path, dcfg: DistillConfig) -> DistillConfig:
  """dcfg with data = the teacher run's data config where it is None."""
  if dcfg.data is not None:
    return dcfg
  return dataclasses.replace(dcfg, data=load_config(teacher_spec(teacher)[0]).data)


def plan(teacher: str | pathlib.Path, dcfg: DistillConfig, out: str | pathlib.Path, *,
         teacher_step: int | None = None, resume: bool = False,
         overwrite: bool = False) -> Plan:
  """Every check that can fail on user input, before any training or file write.

  Raises UserError for: a teacher that is no run or whose checkpoint does not fit its config
  (load_trained), a student that cannot be seeded from it, data the student cannot read, a
  stage whose predecessor's checkpoint is missing, stage directories that already hold runs
  (without --resume / --overwrite) or that were made with other settings.
  """
  if pathlib.Path(out).exists() and not pathlib.Path(out).is_dir():
    raise UserError(f"--out {out} is a file; give a directory for the student's stages.")
  path, step = teacher_spec(teacher)
  step = teacher_step if teacher_step is not None else step
  dcfg = resolve_config(path, dcfg)
  trained = load_trained(path, step=step)
  # A fine-tuned teacher (LoRA / QLoRA run) or a quantized one (memx quantize): its adapters
  # folded and its projections dequantized into plain weights, the form seeding reads.
  dequantize_model(merge_lora(trained.model))
  tcfg = trained.cfg.model
  student_model = student_model_config(tcfg, dcfg.student)
  layers = converted_layers(tcfg, dcfg.student)
  check_mapping(tcfg, student_model, layers)
  check_stage_data(dcfg.data, dcfg, student_model)
  out = pathlib.Path(out)
  teacher_id = _teacher_id(trained)
  _check_existing_distill(out, student_model, teacher_id, overwrite)

  runs, sources = [], {}
  for pos, k in enumerate(dcfg.stages):
    if k == 1 or (pos == 0 and dcfg.from_init):
      source = INIT
    elif pos > 0:
      source = out / f"stage{dcfg.stages[pos - 1]}"
    else:
      source = out / f"stage{k - 1}"
      _check_predecessor(source, k, student_model)
    sources[k] = source
    stage = dcfg.stage(k)
    directory = out / f"stage{k}"
    run_cfg = stage_run_config(student_model, dcfg.data, stage, dcfg)
    identity = _json({
        "teacher": teacher_id, "student": to_dict(dcfg.student), "model": to_dict(student_model),
        "stage": _stage_identity(stage), "data": to_dict(dcfg.data),
        "seed": dcfg.seed, "source": str(source)})
    _check_stage_dir(directory, k, identity, resume, overwrite)
    meta = {"stage": k, "identity": identity, "teacher": teacher_id, "source": str(source),
            "converted_layers": list(layers), "settings": to_dict(stage)}
    runs.append(StageRun(index=k, stage=stage, run_cfg=run_cfg, directory=directory,
                         layers=layers, identity=identity, meta=_json(meta)))
  return Plan(trained, dcfg, student_model, layers, out, runs, sources, resume, overwrite)


def _stage_identity(stage) -> dict:
  """The stage settings a resumed stage must share: not its steps (a resume may train longer)
  nor its microbatches (how a step runs, not what it computes; left out, so identities
  written before the field existed still match)."""
  d = {**to_dict(stage), "steps": None}
  d.pop("microbatches")
  return d


def _teacher_id(trained: Trained) -> dict:
  """What names the teacher in distill.json and the stages' identities: its run, step and the
  checkpoint's digest (a teacher trained again in place keeps its path and step)."""
  return {"run": str(trained.run_dir.resolve()), "step": trained.step,
          "checkpoint": step_digest(trained.run_dir / "checkpoints" / str(trained.step))}


def _check_existing_distill(out: pathlib.Path, student_model, teacher_id, overwrite: bool):
  f = out / "distill.json"
  if not f.is_file() or overwrite:
    return
  try:
    old = json.loads(f.read_text())
  except ValueError:
    return
  if old.get("student_model") != _json(to_dict(student_model)) or old.get("teacher") != teacher_id:
    raise UserError(f"{out} holds a distillation of another teacher or into another student "
                    "(distill.json differs). Choose another --out, or pass --overwrite to "
                    "replace the stages you run.")


def _check_predecessor(source: pathlib.Path, k: int, student_model) -> None:
  ok = (source / "summary.json").is_file() and (source / "checkpoints").is_dir()
  if not ok:
    raise UserError(
        f"stage {k} starts from stage {k - 1}'s final student, but {source} holds no finished "
        f"stage {k - 1} (no summary.json / checkpoints). Run --stages {k - 1},{k} (or include "
        f"stage {k - 1}), or pass --from-init to start stage {k} from the seeded student.")
  have = load_config(source).model
  if have != student_model:
    raise UserError(f"{source} was distilled into another student model than the one asked "
                    f"for now; use the same --student and settings, or another --out.")


def _check_stage_dir(directory: pathlib.Path, k: int, identity: dict, resume: bool,
                     overwrite: bool) -> None:
  if not directory.exists() or not any(directory.iterdir()):
    return
  if not resume:
    if overwrite:
      return
    raise UserError(f"stage directory {str(directory)!r} already holds stage {k}. Pass --resume "
                    "to continue (finished stages are kept), --overwrite to start over, or "
                    "choose another --out.")
  try:
    old = json.loads((directory / "stage.json").read_text()).get("identity")
  except (OSError, ValueError):
    old = None
  if old is not None and old != identity:
    raise UserError(f"stage directory {str(directory)!r} was run with other settings (teacher, "
                    "student, data, source or stage config differ); --resume continues only the "
                    "same stage. Pass --overwrite to start it over, or choose another --out.")


def initial_student(p: Plan, log=print):
  """The seeded (or random) student and the calibration summary."""
  dcfg = p.dcfg
  calib = {}
  stats = None
  if dcfg.student.init == "seed":
    loader = make_loader(dcfg.data, batch_size=dcfg.stage(dcfg.stages[0]).batch_size,
                         seed=_seed_for(dcfg.seed, 99), split="train")
    batches = [to_device(loader.local_batch(i)) for i in range(dcfg.calib_batches)]
    stats, positive = calibrate(p.teacher.model, batches, p.layers)
    calib = {"gate_positive_fraction": {str(i): v for i, v in positive.items()},
             "head_rms": {str(i): [float(x) for x in np.asarray(s.head_rms)]
                          for i, s in stats.items()}}
    if dcfg.student.gate == "mean":
      log("seeding: mean-aimed gate is positive (neutral) for "
          + ", ".join(f"layer {i} {100 * v:.0f}%" for i, v in positive.items())
          + " of calibration tokens")
  student = build_student(p.teacher.model, dcfg.student, stats=stats,
                          key=jax.random.key(dcfg.seed))
  return student, calib


def loaders_for(p: Plan, k: int) -> tuple:
  """(train loader, eval loaders) of stage k. Eval data is the same for every stage."""
  dcfg, stage = p.dcfg, p.dcfg.stage(k)
  train = make_loader(dcfg.data, batch_size=stage.batch_size, seed=_seed_for(dcfg.seed, k),
                      split="train")
  eval_seed = _seed_for(dcfg.seed, 0)
  lm = make_loader(dcfg.data, batch_size=stage.batch_size, seed=eval_seed, split="eval")
  task = None
  name = dcfg.data.task_name
  if name is not None and dcfg.data.source != name:
    task_cfg = dcfg.data.task_only()
    task = make_loader(task_cfg, batch_size=stage.batch_size, seed=eval_seed, split="eval")
  return train, {"lm": lm, "task": task, "batches": dcfg.eval_batches}


def execute(p: Plan, *, progress: bool = True, log=print, loaders=None) -> dict[int, dict]:
  """Runs the planned stages in order; returns {stage: summary}.

  loaders: optional (plan, stage) → (train loader, eval loaders) replacing `loaders_for`, for
  data a single DataConfig cannot describe (experiments/distill mixes two tasks); a train
  loader needs only `local_batch(step)`.
  """
  try:
    p.out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create the distillation output directory {p.out} ({e.strerror}); "
                    "give --out a directory path.") from None
  record = {"teacher": _teacher_id(p.teacher),
            "config": _json(to_dict(p.dcfg)), "student_model": _json(to_dict(p.student_model)),
            "converted_layers": list(p.layers)}
  summaries, init = {}, None
  for run in p.runs:
    k = run.index
    if p.resume and (run.directory / "summary.json").is_file():
      done = json.loads((run.directory / "summary.json").read_text())
      if done.get("steps") != run.stage.steps:
        raise UserError(f"stage {k} in {run.directory} finished after {done.get('steps')} "
                        f"steps, but stage{k}.steps is now {run.stage.steps}: pass --overwrite "
                        "to distil it (and the stages after it) again.")
      summaries[k] = done
      log(f"stage {k}: finished earlier, kept ({run.directory})")
      continue
    if p.overwrite and not p.resume and run.directory.exists():
      shutil.rmtree(run.directory)
    source = p.sources[k]
    if source == INIT:
      if init is None:
        init, calib = initial_student(p, log=log)
        record["calibration"] = calib
        write_json(p.out / "distill.json", record)
      student = init
    else:
      student = load_trained(source).model
    if not (p.out / "distill.json").exists():
      write_json(p.out / "distill.json", record)
    run.directory.mkdir(parents=True, exist_ok=True)
    write_json(run.directory / "config.json", to_dict(run.run_cfg))
    write_json(run.directory / "stage.json", run.meta)
    train, evals = (loaders or loaders_for)(p, k)
    summaries[k] = run_stage(run, student, p.teacher.model, train_loader=train,
                             eval_loaders=evals, resume=p.resume, progress=progress)
    init = None  # run_stage trained it in place
    s = summaries[k]
    log(f"stage {k} ({run.stage.loss}, trains {run.stage.trainable}): eval loss "
        f"{s['final_eval_loss']:.4f} (teacher {s['teacher_loss']:.4f}), KL {s['kl']:.4f}, "
        f"top-1 agreement {s['agreement']:.3f}, layer MSE {s['mse']:.3g} → {run.directory}")
  return summaries


def distill(teacher, dcfg: DistillConfig, out, *, teacher_step: int | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = True,
            log=print, loaders=None) -> dict[int, dict]:
  """plan() then execute(): the library form of `memx distill`."""
  p = plan(teacher, dcfg, out, teacher_step=teacher_step, resume=resume, overwrite=overwrite)
  return execute(p, progress=progress, log=log, loaders=loaders)
