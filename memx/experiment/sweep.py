"""Sweeps: one run per sweep() entry, on a local process pool or SLURM (submitit).

Each run executes in its own process (a subprocess locally, a job under submitit), so one
crashing run never stops the others. The driver alone writes the SQLite index. Re-running a
sweep skips runs that finished with the same config and retries the rest, resuming from
their newest checkpoint when the config is unchanged.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from memx.config import drop_neutral, to_dict
from memx.errors import UserError, exception_lines
from memx.experiment import loading
from memx.experiment.index import RunIndex
from memx.experiment.runner import RunSpec, is_distill_entry, run
from memx.train import kd, local
from memx.train.finetune import base_entry, check_against, run_hash

EXECUTORS = ("local", "slurm", "submitit-local")


def plan(experiment: str, variant: str | None, workdir: str) -> tuple[pathlib.Path, list]:
  """Validates every entry's config before anything runs; returns (sweep dir, [(spec, config
  hash, data hash)]): the data hash covers the bytes of the entry's data files (None for a
  distillation entry), which its config hash, naming only their paths, does not."""
  module = loading.load_module(pathlib.Path(experiment))
  entries = loading.sweep_entries(module)
  sweep_dir = pathlib.Path(workdir) / pathlib.Path(experiment).stem
  from memx.train.loop import check_data
  out, hashes, configs, tuned, data_hashes = [], {}, {}, set(), {}
  for name, overrides in entries:
    try:
      if is_distill_entry(overrides):  # a student distilled from an earlier entry's run
        from memx.distill import sweep_entry
        teacher, dcfg, data = sweep_entry.build(module, variant, overrides, list(hashes),
                                                teacher_cfgs=configs)
        from memx.distill.config import HASH_NEUTRAL
        blob = json.dumps({"teacher": hashes[teacher],
                           "distill": drop_neutral(to_dict(dcfg), HASH_NEUTRAL),
                           **({"data": data} if data else {})},
                          sort_keys=True, default=str)
        h = hashlib.sha256(blob.encode()).hexdigest()[:12]
        data_hash = None
      else:
        base = base_entry(overrides)
        if base is not None:  # fine-tunes an earlier training entry's run
          if base not in configs or base in tuned:
            raise UserError(f"finetune.base = '@{base}' names no earlier training entry of this "
                            f"sweep that trains from scratch (earlier ones: "
                            f"{', '.join(n for n in configs if n not in tuned) or 'none'}).")
          overrides = {**overrides, "finetune.base": str(sweep_dir / base)}
          tuned.add(name)
        teacher = base_entry(overrides, "teacher.run")
        if teacher is not None:  # distils an earlier training entry's run
          if teacher not in configs:
            raise UserError(f"teacher.run = '@{teacher}' names no earlier training entry of "
                            f"this sweep (earlier ones: {', '.join(configs) or 'none'}).")
          overrides = {**overrides, "teacher.run": str(sweep_dir / teacher)}
        cfg = loading.build_config(module, variant, overrides)
        # files, lengths, task rows, vocabulary: before any entry trains
        data_hash = check_data(cfg)
        configs[name] = cfg
        data_hashes[name] = data_hash
        if base is not None:  # fits its base, takes its adapters: before the base trains
          check_against(cfg, configs[base])
        if teacher is not None:  # speaks its teacher's vocabulary: before the teacher trains
          kd.check_config(cfg)
          kd.check_against(cfg, configs[teacher], f"@{teacher}")
        local.check(cfg)
        # (a fine-tune's or a distilled run's hash covers its base's or teacher's, as their
        # provenance will record them)
        h = run_hash(cfg, *(None if e is None else f"{hashes[e]}/{data_hashes[e]}"
                            for e in (base, teacher)))
    except UserError as e:
      raise UserError(f"sweep entry {name!r}: {e}") from None
    hashes[name] = h
    out.append((RunSpec(str(experiment), variant, dict(overrides), str(sweep_dir), name), h,
                data_hash))
  return sweep_dir, out


def run_sweep(experiment: str, *, variant: str | None = None, workdir: str = "runs",
              workers: int = 1, executor: str = "local", slurm: dict | None = None,
              progress: bool = True, log=print) -> pathlib.Path:
  """Runs the sweep and writes its report; returns the sweep directory."""
  if executor not in EXECUTORS:
    raise UserError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}.")
  if workers < 1:
    raise UserError(f"--workers {workers} is not allowed: use 1 or more.")
  if executor == "local" and slurm:
    raise UserError(f"--slurm {', '.join(slurm)} is for the slurm and submitit-local executors; "
                    "the local executor takes none (pass --executor slurm).")
  sweep_dir, entries = plan(experiment, variant, workdir)
  # A bad executor parameter is refused before the sweep's index exists (submitit creates its
  # folder as it starts: a new sweep directory is removed again).
  existed = sweep_dir.exists()
  try:
    ex = None if executor == "local" else _executor(executor, slurm or {},
                                                    sweep_dir / "submitit")
  except UserError:
    if not existed:
      shutil.rmtree(sweep_dir, ignore_errors=True)
    raise
  try:
    sweep_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create sweep directory {str(sweep_dir)!r} ({e.strerror}).") from None
  lock = _claim(sweep_dir)
  index = RunIndex(sweep_dir / "index.sqlite")
  try:
    todo = []
    for spec, h, _ in entries:
      index.register(spec.name, h)
    for i, (spec, h, data_hash) in enumerate(entries, 1):
      row = index.get(spec.name)
      run_dir = sweep_dir / spec.name
      # Data files rewritten under the same paths: the config hash is unchanged, the data not.
      same_data = data_hash is None or _provenance(run_dir, "data_hash") in (data_hash, None)
      finished = (row["status"] == "done" and row["config_hash"] == h and same_data
                  and (run_dir / "summary.json").exists())
      if finished:
        log(f"[{i}/{len(entries)}] {spec.name}: finished earlier, skipped")
        continue
      # Same config and data: continue from its checkpoint. Changed: start that run over. The
      # directory's own record decides where it has one: the index row takes the new hash when
      # the run is queued, before its worker has cleared the old run.
      same = (row["config_hash"] == h and row["status"] != "pending" and same_data
              and _provenance(run_dir, "config_hash") in (h, None))
      todo.append((i, spec, h, same))
    # Fine-tunes of entries ("finetune.base": "@NAME") need their bases' checkpoints, runs
    # distilled from entries ("teacher.run": "@NAME") their teachers', and mmMamba
    # distillations their teachers': each runs in a phase after the one that trains what it
    # needs.
    phase_of: dict[str, int] = {}
    for spec, _, _ in entries:
      needs = [pathlib.Path(str(spec.overrides.get(k))) for k in ("finetune.base", "teacher.run")]
      phase_of[spec.name] = 1 + max((phase_of.get(p.name, 0) for p in needs
                                     if p.parent == sweep_dir), default=-1)
    last = max(phase_of.values(), default=0)
    phases = [[t for t in todo if not is_distill_entry(t[1].overrides)
               and phase_of[t[1].name] == k] for k in range(last + 1)]
    phases.append([t for t in todo if is_distill_entry(t[1].overrides)])
    with _sigterm_as_interrupt():
      for phase in filter(None, phases):
        if executor == "local":
          _run_local(phase, len(entries), index, workers, progress, log)
        else:
          _run_submitit(phase, len(entries), index, ex, log)
  finally:
    index.close()
    lock.close()  # releases the claim
  return sweep_dir


@contextlib.contextmanager
def _sigterm_as_interrupt():
  """SIGTERM to the driver (a scheduler's cancel, `kill`) stops the sweep as Ctrl-C does: its
  runs are stopped and marked, not left running without it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def interrupt(signum, frame):
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _claim(sweep_dir: pathlib.Path):
  """An exclusive lock on SWEEP/.lock for this driver's lifetime (released when it exits or
  dies): a second driver on the same sweep would train every queued run again, in the same
  run directories, at the same time."""
  import fcntl
  import os

  f = open(sweep_dir / ".lock", "a+")  # noqa: SIM115 - held until the sweep ends
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "?"
    f.close()
    raise UserError(f"another `memx sweep` (pid {holder}) is running on {str(sweep_dir)!r}; "
                    "wait for it to finish (its runs and report are this sweep's), or stop it "
                    "first.") from None
  f.truncate(0)
  f.write(str(os.getpid()))
  f.flush()
  return f


def _provenance(run_dir: pathlib.Path, key: str) -> str | None:
  """What a run directory's provenance.json records under `key` (the config hash or the data
  hash it was started with), if anything."""
  try:
    return json.loads((run_dir / "provenance.json").read_text()).get(key)
  except (OSError, ValueError, AttributeError):
    return None


INTERRUPTED = ("interrupted: the sweep driver was stopped (Ctrl-C or SIGTERM) and stopped this "
               "run (a checkpoint is saved where enabled); rerun the sweep to continue it")


class _Children:
  """The run processes a driver started: stopped with it (SIGTERM: each saves a checkpoint and
  exits; SIGKILL after `grace` s), and none started once it is stopping."""

  def __init__(self, grace: float = 120.0):
    self.live: set[subprocess.Popen] = set()
    self.stopping = threading.Event()
    self.grace = grace
    self._lock = threading.Lock()

  def run(self, cmd, **kwargs) -> int | None:
    """The command's exit status, or None when the driver is stopping (nothing started)."""
    with self._lock:
      if self.stopping.is_set():
        return None
      proc = subprocess.Popen(cmd, **kwargs)
      self.live.add(proc)
    try:
      return proc.wait()
    finally:
      with self._lock:
        self.live.discard(proc)

  def stop(self) -> None:
    with self._lock:
      self.stopping.set()
      procs = list(self.live)
    for proc in procs:
      with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    deadline = time.monotonic() + self.grace
    for proc in procs:
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_local(todo, total, index, workers, progress, log):
  children = _Children()

  def one(item):
    i, spec, _, same = item
    ok, result = _subprocess_run(spec, resume=same, overwrite=not same,
                                 show_output=progress and workers == 1, children=children)
    return i, spec, ok, result

  recorded = set()
  try:
    if workers == 1:  # in order, each run's progress bar under its "[i/n]" line
      for item in todo:
        index.mark_running(item[1].name, item[2])
        log(f"[{item[0]}/{total}] {item[1].name}: running")
        _record(index, total, *one(item), log)
        recorded.add(item[1].name)
      return
    # sqlite connections stay on this thread: rows are updated here, not in the workers.
    for i, spec, h, _ in todo:
      index.mark_running(spec.name, h)
      log(f"[{i}/{total}] {spec.name}: queued (output in {spec.workdir}/{spec.name}.log)")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
      for fut in concurrent.futures.as_completed([pool.submit(one, item) for item in todo]):
        i, spec, ok, result = fut.result()
        _record(index, total, i, spec, ok, result, log)
        recorded.add(spec.name)
    finally:
      pool.shutdown(wait=False, cancel_futures=True)
      if not children.stopping.is_set() and len(recorded) < len(todo):
        children.stop()  # an interrupt: stop what runs before the pool's threads are joined
      pool.shutdown(wait=True)
  except BaseException:
    # Ctrl-C / SIGTERM: no queued run starts, the running ones are stopped (not orphaned), and
    # their rows say so, not "running" with no driver left.
    children.stop()
    for item in todo:
      if item[1].name not in recorded and index.get(item[1].name)["status"] == "running":
        index.mark_failed(item[1].name, INTERRUPTED)
    raise


def _record(index, total, i, spec, ok, result, log):
  if ok:
    index.mark_done(spec.name, result)
    log(f"[{i}/{total}] {spec.name}: done")
  else:
    index.mark_failed(spec.name, result)
    first = result.strip().splitlines()[-1] if result.strip() else "failed"
    log(f"[{i}/{total}] {spec.name}: FAILED: {first}")


def _with_cause_last(text: str) -> str:
  """submitit ends its message with a log path: repeat the exception line last."""
  lines, causes = [ln.strip() for ln in text.splitlines()], exception_lines(text)
  return text if not causes or lines[-1] == causes[-1] else f"{text}\n{causes[-1]}"


def _subprocess_run(spec: RunSpec, *, resume: bool, overwrite: bool, show_output: bool,
                    children: _Children) -> tuple[bool, Any]:
  run_dir = pathlib.Path(spec.workdir) / spec.name
  with tempfile.TemporaryDirectory() as tmp:
    spec_file, err_file = pathlib.Path(tmp) / "spec.json", pathlib.Path(tmp) / "error.txt"
    spec_file.write_text(json.dumps(spec.__dict__))
    cmd = [sys.executable, "-m", "memx.experiment.sweep", str(spec_file), str(err_file)]
    cmd += ["--resume"] if resume else ["--overwrite"] if overwrite else []
    cmd += [] if show_output else ["--quiet"]  # a log file gets no progress bar redraws
    if show_output:
      rc = children.run(cmd)
    else:
      log_path = pathlib.Path(spec.workdir) / f"{spec.name}.log"
      with open(log_path, "w") as f:
        rc = children.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc is None or (children.stopping.is_set() and rc != 0):
      return False, INTERRUPTED
    if rc == 0 and (run_dir / "summary.json").exists():
      return True, json.loads((run_dir / "summary.json").read_text())
    error = err_file.read_text() if err_file.exists() else ""
    return False, error or f"run process exited with code {rc}"


def _executor(executor: str, slurm: dict, folder: pathlib.Path):
  """The submitit executor with its parameters (checked by submitit: nothing is written yet)."""
  import submitit

  try:
    if executor == "slurm":
      ex = submitit.AutoExecutor(folder=folder)
      ex.update_parameters(**{"timeout_min": 60, **slurm})
    else:
      unknown = sorted(set(slurm) - {"timeout_min"})
      if unknown:
        raise ValueError(f"the submitit-local executor takes only timeout_min, not {unknown}")
      ex = submitit.LocalExecutor(folder=folder)
      ex.update_parameters(timeout_min=int(slurm.get("timeout_min", 60)))
  except (ValueError, TypeError, NameError) as e:
    raise UserError(f"--slurm parameters {slurm} were refused: {e}") from None
  return ex


def _run_submitit(todo, total, index, ex, log):
  jobs, recorded = [], set()
  try:
    for i, spec, h, same in todo:
      index.mark_running(spec.name, h)
      jobs.append((i, spec, ex.submit(run_job, spec, same, not same)))
      log(f"[{i}/{total}] {spec.name}: submitted job {jobs[-1][2].job_id}")
    for i, spec, job in jobs:
      try:
        ok, result = True, job.result()
      except Exception as e:  # noqa: BLE001 - a failed job must not stop the others
        ok, result = False, _with_cause_last(str(e))
      _record(index, total, i, spec, ok, result, log)
      recorded.add(spec.name)
  except BaseException:
    # Ctrl-C / SIGTERM: the submitted jobs are cancelled with the driver, and marked.
    for _, spec, job in jobs:
      if spec.name not in recorded:
        with contextlib.suppress(Exception):
          job.cancel()
        index.mark_failed(spec.name, INTERRUPTED)
    raise


def run_job(spec: RunSpec, resume: bool, overwrite: bool) -> dict:
  """The function a submitit job executes (SLURM or local): one run, no progress bar."""
  return run(spec, resume=resume, overwrite=overwrite, progress=False)


def _worker_main(argv: list[str]) -> int:
  spec_file, err_file, *flags = argv
  spec = RunSpec(**json.loads(pathlib.Path(spec_file).read_text()))
  try:
    run(spec, resume="--resume" in flags, overwrite="--overwrite" in flags,
        progress="--quiet" not in flags)
    return 0
  except UserError as e:
    pathlib.Path(err_file).write_text(str(e))
    print(f"memx: {e}", file=sys.stderr)
  except Exception as e:  # noqa: BLE001 - reported to the driver, which keeps going
    pathlib.Path(err_file).write_text(traceback.format_exc() + f"\n{type(e).__name__}: {e}")
    traceback.print_exc()
  return 1


if __name__ == "__main__":
  sys.exit(_worker_main(sys.argv[1:]))
