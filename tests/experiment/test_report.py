"""Tests for the sweep report: tables, differing config, plots, atomic writes and user errors."""

import copy
import json
import sqlite3

import pytest

from memx.errors import UserError
from memx.experiment import report
from memx.experiment.report import summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MiB = 2**20

BASE_CONFIG = {
    "model": {"d_model": 64, "n_layers": 2, "attention": "reference", "window": None},
    "data": {"source": "corpus", "paths": [], "seq_len": 128},
    "optim": {"lr": 3e-3, "warmup_steps": 50, "clip_norm": 1.0},
    "train": {"steps": 100, "batch_size": 16, "seed": 0},
    "parallel": {"data": 1, "fsdp": 1},
    "checkpoint": {"enabled": True, "every": 500, "keep": 2},
}


def _config(**changes):
  cfg = copy.deepcopy(BASE_CONFIG)
  for dotted, value in changes.items():
    section, key = dotted.split("__")
    cfg[section][key] = value
  return cfg


def _summary(name, *, train, eval_loss, acc, tps, temp, peak=None):
  return {"name": name, "config_hash": "abc123", "status": "done", "steps": 100,
          "params": 1_234_567, "final_train_loss": train, "final_eval_loss": eval_loss,
          "eval_perplexity": 2.718281828 ** eval_loss, "task_accuracy": acc,
          "tokens_per_s": tps, "step_time_s": 0.05,
          "memory": {"argument_bytes": 3 * MiB, "output_bytes": 3 * MiB, "temp_bytes": temp,
                     "generated_code_bytes": 100_000, "peak_bytes": peak},
          "param_bytes": 4_938_268, "opt_state_bytes": 9_876_536, "checkpoint_bytes": 15 * MiB,
          "wall_s": 12.5}


def _metrics(start, slope, steps=100, eval_every=50):
  recs = []
  for step in range(10, steps + 1, 10):
    recs.append({"step": step, "split": "train", "loss": start - slope * step, "lr": 1e-3,
                 "grad_norm": 1.0, "tokens_per_s": 12000.0})
    if step % eval_every == 0:
      recs.append({"step": step, "split": "eval", "loss": start - slope * step + 0.1,
                   "perplexity": 10.0, "accuracy": 0.4})
  return recs


def _write_run(sweep, name, config, metrics, summary=None, partial_tail=""):
  d = sweep / name
  d.mkdir()
  (d / "config.json").write_text(json.dumps(config))
  text = "".join(json.dumps(r) + "\n" for r in metrics)
  (d / "metrics.jsonl").write_text(text + partial_tail)
  if summary is not None:
    (d / "summary.json").write_text(json.dumps(summary))


def _write_index(sweep, rows):
  con = sqlite3.connect(sweep / "index.sqlite")
  con.execute("CREATE TABLE runs(name TEXT PRIMARY KEY, config_hash TEXT, status TEXT, "
              "started REAL, ended REAL, summary TEXT, error TEXT)")
  con.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
  con.commit()
  con.close()


def _make_sweep(sweep):
  """3 runs in sweep order baseline, flash, big_lr (not alphabetical, to check the order)."""
  sweep.mkdir()
  _write_run(sweep, "baseline", _config(), _metrics(4.0, 0.02),
             _summary("baseline", train=2.05, eval_loss=2.20, acc=0.41, tps=12000.0,
                      temp=40 * MiB))
  _write_run(sweep, "flash", _config(model__attention="flash"), _metrics(4.0, 0.021),
             _summary("flash", train=1.95, eval_loss=2.10, acc=0.45, tps=15000.0,
                      temp=8 * MiB))
  # Killed mid-write: a truncated last metrics line and no summary.
  _write_run(sweep, "big_lr", _config(optim__lr=1.0), _metrics(4.0, 0.01, steps=30),
             partial_tail='{"step": 40, "split": "tr')
  error = ("Traceback (most recent call last):\n  File \"loop.py\", line 1\n"
           "NonFiniteLossError: loss became non-finite (nan) at step 40\n")
  _write_index(sweep, [
      ("baseline", "h1", "done", 1.0, 2.0, None, None),
      ("flash", "h2", "done", 2.0, 3.0, None, None),
      ("big_lr", "h3", "failed", 3.0, 4.0, None, error),
  ])
  return sweep


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  sweep = _make_sweep(tmp_path_factory.mktemp("sweeps") / "attn_ablation")
  index_before = (sweep / "index.sqlite").read_bytes()
  path = write_report(sweep)
  return sweep, path, path.read_text(), index_before


def _section(text, title):
  return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(section):
  """Header and rows (lists of cells) of the first Markdown table in a section."""
  lines = [ln for ln in section.splitlines() if ln.startswith("|")]
  cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
  return cells[0], cells[2:]


def test_report_lists_every_run_with_status_in_sweep_order(built):
  sweep, path, text, _ = built
  assert path == sweep / "report.md" and path.is_file()
  assert text.startswith("# Sweep report: attn_ablation")
  assert "3 runs: 2 done, 1 failed." in text
  header, rows = _table(_section(text, "Comparison"))
  assert header[:2] == ["run", "status"]
  assert [r[:2] for r in rows] == [["baseline", "done"], ["flash", "done"], ["big_lr", "failed"]]
  for col in ("params", "train loss", "eval loss", "eval ppl", "task acc", "tokens/s",
              "opt state", "argument mem", "output mem", "temp mem", "checkpoint"):
    assert col in header
  assert "peak mem" not in header  # no run measured it (CPU)
  failed = rows[2]
  assert set(failed[2:]) == {report.MISSING}
  flash = dict(zip(header, rows[1], strict=True))
  assert flash["params"] == "1.23M"
  assert flash["temp mem"] == "**8.0 MiB**"
  assert flash["argument mem"] == "3.0 MiB"  # equal across runs: nothing to single out
  assert flash["opt state"] == "9.4 MiB"  # optimizer ablations compare their state here


def test_failed_run_shows_error_line(built):
  text = built[2]
  assert ("- **big_lr** (failed): NonFiniteLossError: loss became non-finite (nan) at step 40"
          in text)
  assert "Traceback" not in text


def test_error_line_names_the_exception():
  from memx.experiment.report import _error_line
  submitit = ("Job (task=0) failed during processing with trace:\n----------------------\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "memx.errors.NonFiniteLossError: loss became non-finite (nan) at step 3\n\n"
              "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'")
  assert _error_line(submitit) == ("memx.errors.NonFiniteLossError: loss became non-finite "
                                   "(nan) at step 3")
  assert _error_line("disk full\nmore detail") == "disk full"


def test_differing_config_lists_exactly_the_differing_keys(built):
  header, rows = _table(_section(built[2], "What differs"))
  assert header == ["run", "model.attention", "optim.lr"]
  assert rows == [["baseline", "reference", "0.003"], ["flash", "flash", "0.003"],
                  ["big_lr", "reference", "1.0"]]


def test_bold_marks_best_values(built):
  header, rows = _table(_section(built[2], "Comparison"))
  by_run = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
  assert by_run["flash"]["eval loss"] == "**2.1000**"
  assert by_run["baseline"]["eval loss"] == "2.2000"
  assert by_run["flash"]["task acc"] == "**45.0%**"  # highest accuracy
  assert by_run["flash"]["tokens/s"] == "**15,000**"  # highest throughput
  assert not by_run["baseline"]["params"].startswith("**")  # params are never "best"


def test_plots_are_valid_pngs_linked_from_report(built):
  from matplotlib import image
  sweep, _, text, _ = built
  for name in ("loss.png", "memory.png", "throughput.png"):
    path = sweep / name
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    img = image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert f"]({name})" in text


def test_writes_are_atomic_and_index_untouched(built):
  sweep, _, _, index_before = built
  assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]
  assert (sweep / "index.sqlite").read_bytes() == index_before
  assert oct((sweep / "report.md").stat().st_mode & 0o777) == oct(0o644)


def test_summary_table_contains_every_run(built):
  table = summary_table(built[0])
  lines = table.splitlines()
  assert lines[0].split() == ["run", "status", "eval", "loss", "task", "acc", "tokens/s", "temp",
                              "mem"]
  assert [ln.split()[:2] for ln in lines[2:]] == [["baseline", "done"], ["flash", "done"],
                                                  ["big_lr", "failed"]]
  assert "2.1000" in lines[3] and "15,000" in lines[3] and "8.0 MiB" in lines[3]
  assert "**" not in table


def test_without_index_runs_come_from_directories(tmp_path):
  sweep = tmp_path / "sweep"
  sweep.mkdir()
  _write_run(sweep, "b_run", _config(), _metrics(4.0, 0.02),
             _summary("b_run", train=2.0, eval_loss=2.1, acc=None, tps=9000.0, temp=MiB,
                      peak=64 * MiB))
  _write_run(sweep, "a_run", _config(train__seed=1), _metrics(4.0, 0.02, steps=20))
  (sweep / "notes").mkdir()  # not a run: no run files
  text = write_report(sweep).read_text()
  header, rows = _table(_section(text, "Comparison"))
  assert [r[:2] for r in rows] == [["a_run", "incomplete"], ["b_run", "done"]]
  assert "peak mem" in header  # a GPU run measured peak bytes
  assert dict(zip(header, rows[1], strict=True))["task acc"] == report.MISSING
  assert "1 incomplete" in text
  assert _table(_section(text, "What differs"))[0] == ["run", "train.seed"]
  assert "notes" not in text


def test_an_unreadable_index_is_reported_not_hidden(tmp_path, caplog):
  sweep = tmp_path / "sweep"
  sweep.mkdir()
  _write_run(sweep, "a_run", _config(), _metrics(4.0, 0.02))
  (sweep / "index.sqlite").write_bytes(b"not a database" * 100)
  with caplog.at_level("WARNING", logger="memx.experiment.report"):
    text = write_report(sweep).read_text()
  assert "a_run" in text
  assert "could not read the run index" in caplog.text and "index.sqlite" in caplog.text


def test_identical_configs_and_single_run(tmp_path):
  sweep = tmp_path / "one"
  sweep.mkdir()
  _write_run(sweep, "only", _config(), _metrics(4.0, 0.02),
             _summary("only", train=2.0, eval_loss=2.1, acc=0.5, tps=9000.0, temp=MiB))
  text = write_report(sweep).read_text()
  assert "1 run: 1 done, 0 failed." in text
  assert "**" not in _section(text, "Comparison").split("|", 1)[1]  # nothing to compare against
  assert "Fewer than two runs" in text


def test_missing_or_empty_dir_raises_user_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    write_report(tmp_path / "nope")
  with pytest.raises(UserError, match="no runs found"):
    write_report(tmp_path)
  with pytest.raises(UserError, match="no runs found"):
    summary_table(tmp_path)
  (tmp_path / "file.txt").write_text("x")
  with pytest.raises(UserError, match="not a directory"):
    write_report(tmp_path / "file.txt")
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  with pytest.raises(UserError, match="single run"):
    write_report(run)


def test_formatting_helpers():
  assert report._fmt_bytes(512) == "512 B"
  assert report._fmt_bytes(1.2 * MiB) == "1.2 MiB"
  assert report._fmt_bytes(300 * MiB) == "300 MiB"
  assert report._fmt_bytes(3 * 2**30) == "3.0 GiB"
  assert report._fmt_count(999) == "999"
  assert report._fmt_count(999_999) == "1M"
  assert report._fmt_count(1_300_000_000) == "1.3B"
  assert report._fmt_pct(0.41) == "41.0%"


def test_index_summary_fallback_and_stale_status(tmp_path):
  sweep = tmp_path / "sweep"
  sweep.mkdir()
  # The driver died before marking "stale" done, but its summary.json was written.
  _write_run(sweep, "stale", _config(), _metrics(4.0, 0.02),
             _summary("stale", train=2.0, eval_loss=2.1, acc=0.5, tps=9000.0, temp=MiB))
  (sweep / "stale" / "provenance.json").write_text(json.dumps({"config_hash": "h1"}))
  remote = _summary("remote", train=2.0, eval_loss=1.9, acc=0.5, tps=9000.0, temp=MiB)
  # Queued again after a config edit (h4), its directory still the earlier config's (h0); and a
  # rerun that failed before clearing its directory: neither shows the earlier results.
  for name in ("requeued", "refailed"):
    _write_run(sweep, name, _config(optim__lr=0.5), _metrics(4.0, 0.02),
               _summary(name, train=1.0, eval_loss=1.0, acc=0.9, tps=99000.0, temp=1))
    (sweep / name / "provenance.json").write_text(json.dumps({"config_hash": "h0"}))
  _write_index(sweep, [
      ("stale", "h1", "running", 1.0, None, None, None),
      ("remote", "h2", "done", 1.0, 2.0, json.dumps(remote), None),  # run dir not copied here
      ("../escape", "h3", "failed", 1.0, 2.0, None, "boom"),  # never a path outside DIR
      ("requeued", "h4", "running", 1.0, None, None, None),
      ("refailed", "h5", "failed", 1.0, 2.0, None, "ConfigError: bad mesh"),
  ])
  text = write_report(sweep).read_text()
  _, rows = _table(_section(text, "Comparison"))
  assert [r[:2] for r in rows] == [["stale", "done"], ["remote", "done"],
                                   ["requeued", "running"], ["refailed", "failed"]]
  assert rows[1][4] == "**1.9000**"
  assert all(cell == report.MISSING for r in rows[2:] for cell in r[2:])
  assert "optim.lr" not in text  # the earlier attempt's config is not the requeued run's
