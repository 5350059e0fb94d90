"""Ablation-sweep report: one Markdown page with comparison tables and PNG plots across runs.

A sweep directory holds one subdirectory per run (`config.json`, `metrics.jsonl` and, once the
run finished, `summary.json`) and, when the sweep driver wrote it, `index.sqlite` with the runs
in sweep order and their status and errors. Everything here only reads those files; the report
(`report.md`, `loss.png`, `memory.png`, `throughput.png`) is written next to them.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from memx._io import atomic_file
from memx.errors import UserError, exception_lines

__all__ = ["summary_table", "write_report"]

MISSING = "–"
REPORT_NAME = "report.md"
PLOTS = {"loss": "loss.png", "memory": "memory.png", "throughput": "throughput.png"}
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
_ERROR_CHARS = 200  # first error lines longer than this are cut, so the list stays scannable


@dataclasses.dataclass
class _Run:
  name: str
  status: str
  config: dict | None = None
  summary: dict | None = None
  metrics: list[dict] = dataclasses.field(default_factory=list)
  error: str | None = None
  evaluations: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Column:
  header: str
  path: tuple[str, ...]  # keys into summary.json
  fmt: Callable[[float], str]
  better: str | None  # "min", "max" or None (descriptive, never bold)


# ---------------------------------------------------------------------------------------------
# Formatting

def _fmt_bytes(n: float) -> str:
  if not math.isfinite(n):
    return str(n)
  units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
  v, i = float(n), 0
  while abs(v) >= 1024 and i < len(units) - 1:
    v, i = v / 1024, i + 1
  if i == 0:
    return f"{int(v)} B"
  return f"{v:.0f} {units[i]}" if abs(v) >= 100 else f"{v:.1f} {units[i]}"


def _fmt_count(n: float) -> str:
  if not math.isfinite(n):
    return str(n)
  if abs(n) < 1000:
    return f"{n:g}"
  # "B" for billions is the usual spelling for parameter counts (1.3B).
  units, v, i = ("k", "M", "B", "T"), n / 1000, 0
  while abs(v) >= 999.5 and i < len(units) - 1:  # 999.5 would print as "1e+03" at 3 digits
    v, i = v / 1000, i + 1
  return f"{v:.3g}{units[i]}"


def _fmt_fixed(digits: int) -> Callable[[float], str]:
  return lambda v: f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def _fmt_pct(v: float) -> str:
  return f"{v:.1%}" if math.isfinite(v) else str(v)


def _fmt_rate(v: float) -> str:
  return f"{v:,.0f}" if math.isfinite(v) else str(v)


# Labels of the memory plot's legend; the first three are XLA's compile-time analysis.
_MEMORY_KINDS = (("argument", "argument_bytes"), ("output", "output_bytes"),
                 ("temp", "temp_bytes"), ("peak (measured)", "peak_bytes"))

_COLUMNS = (
    _Column("params", ("params",), _fmt_count, None),
    _Column("trainable", ("trainable_params",), _fmt_count, None),
    _Column("train loss", ("final_train_loss",), _fmt_fixed(4), "min"),
    _Column("eval loss", ("final_eval_loss",), _fmt_fixed(4), "min"),
    _Column("eval ppl", ("eval_perplexity",), _fmt_fixed(2), "min"),
    _Column("task acc", ("task_accuracy",), _fmt_pct, "max"),
    _Column("tokens/s", ("tokens_per_s",), _fmt_rate, "max"),
    _Column("opt state", ("opt_state_bytes",), _fmt_bytes, "min"),
    _Column("argument mem", ("memory", "argument_bytes"), _fmt_bytes, "min"),
    _Column("output mem", ("memory", "output_bytes"), _fmt_bytes, "min"),
    _Column("temp mem", ("memory", "temp_bytes"), _fmt_bytes, "min"),
    _Column("peak mem", ("memory", "peak_bytes"), _fmt_bytes, "min"),
    _Column("checkpoint", ("checkpoint_bytes",), _fmt_bytes, "min"),
)
_OPTIONAL_COLUMNS = {"peak mem"}  # shown only when some run measured it (GPU runs)
_SUMMARY_COLUMNS = ("eval loss", "task acc", "tokens/s", "temp mem")


def _number(d: Any, path: Sequence[str]) -> float | None:
  """The number at `path` in nested dicts, or None when missing or not a number."""
  for key in path:
    if not isinstance(d, dict):
      return None
    d = d.get(key)
  if isinstance(d, bool) or not isinstance(d, int | float):
    return None
  return d


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> str:
  align = ["---:" if i in right else ":---" for i in range(len(header))]
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

  def line(cells):
    pairs = enumerate(zip(cells, widths, strict=True))
    out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
    return "  ".join(out).rstrip()

  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------
# Reading a sweep

def _read_json(path: Path) -> dict | None:
  # A file a crashed run left half-written reads as missing rather than failing the report.
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _read_metrics(path: Path) -> list[dict]:
  records = []
  try:
    with path.open() as f:
      for line in f:
        # A run killed mid-write leaves a truncated last line; skip it and keep the rest.
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict):
          records.append(rec)
  except OSError:
    pass
  return records


def _read_index(path: Path) -> list[dict]:
  """Rows of index.sqlite in sweep (rowid) order; [] when it is absent or unreadable."""
  if not path.is_file():
    return []
  try:
    # mode=ro: the sweep driver may still be writing; the report must never change the index.
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    with contextlib.closing(con):
      con.row_factory = sqlite3.Row
      rows = con.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
      return [dict(r) for r in rows]
  except sqlite3.Error as e:
    # Busy past the timeout (a sweep driver holding a write lock) or damaged: the report goes
    # on from the run directories, without the index's statuses and error texts, and says so.
    logging.getLogger(__name__).warning(
        "could not read the run index %s (%s): run statuses and errors are missing from the "
        "report; run `memx report` again once the sweep has finished writing", path, e)
    return []


def _error_line(error: str) -> str:
  """The line that names the error: the last "SomeError: ..." line (a traceback's last line;
  submitit's message ends with a log path after it), else the first line."""
  lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
  causes = exception_lines(error)
  if causes:
    return causes[-1]
  return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]


def _load_runs(sweep_dir: Path) -> list[_Run]:
  if not sweep_dir.exists():
    raise UserError(f"sweep directory {str(sweep_dir)!r} does not exist; pass the directory "
                    "that `memx sweep` wrote (one subdirectory per run).")
  if not sweep_dir.is_dir():
    raise UserError(f"{str(sweep_dir)!r} is not a directory; pass the sweep directory that "
                    "`memx sweep` wrote (one subdirectory per run).")
  # A name must be one plain path component, so a bad index row cannot point outside DIR.
  index = [r for r in _read_index(sweep_dir / "index.sqlite") if isinstance(r.get("name"), str)
           and r["name"] not in ("", ".", "..") and "/" not in r["name"] and "\\" not in r["name"]]
  names = list(dict.fromkeys(r["name"] for r in index))
  by_name = {r["name"]: r for r in index}
  # Run directories the index does not know (or no index at all) follow, sorted by name.
  dirs = sorted(p.name for p in sweep_dir.iterdir()
                if p.is_dir() and not p.name.startswith(".")
                and any((p / f).is_file() for f in _RUN_FILES))
  names += [n for n in dirs if n not in by_name]
  if not names:
    hint = ""
    if any((sweep_dir / f).is_file() for f in _RUN_FILES):
      hint = f" It looks like a single run; pass its parent {str(sweep_dir.parent)!r} instead."
    raise UserError(f"no runs found in {str(sweep_dir)!r}: expected subdirectories holding "
                    f"config.json, metrics.jsonl or summary.json, or an index.sqlite.{hint}")

  runs = []
  for name in names:
    run_dir, row = sweep_dir / name, by_name.get(name, {})
    summary = _read_json(run_dir / "summary.json")
    if summary is None and isinstance(row.get("summary"), str):
      with contextlib.suppress(ValueError):
        parsed = json.loads(row["summary"])
        summary = parsed if isinstance(parsed, dict) else None
    status = row.get("status")
    config = _read_json(run_dir / "config.json")
    # The files of a run the index knows are trusted only when its directory was started with
    # the config the index holds (provenance.json's hash): a rerun queued after a config edit,
    # or one that failed before clearing its directory, still shows the earlier attempt's.
    wanted = row.get("config_hash")
    ran = (_read_json(run_dir / "provenance.json") or {}).get("config_hash")
    earlier = bool(wanted) and ran is not None and ran != wanted
    if status == "failed" or earlier:
      summary = None  # a failed attempt has no results; any summary.json is an older one's
      if earlier:
        config = None
    # summary.json is written last, so it outranks an index row the driver never updated
    # (a driver killed between the run's end and its bookkeeping).
    elif summary is not None and (status is None or (status in ("pending", "running")
                                                     and ran is not None)):
      status = summary.get("status") or "done"
    elif status in ("pending", "running"):
      summary = None  # (a distillation entry: no provenance of its own to tell attempts apart)
    if not status:
      status = "incomplete"
    error = row.get("error")
    error = _error_line(error) if isinstance(error, str) and error.strip() else None
    runs.append(_Run(name=name, status=str(status), config=config,
                     summary=summary, metrics=_read_metrics(run_dir / "metrics.jsonl"),
                     error=error, evaluations=_read_evaluations(run_dir)))
  return runs


def _read_evaluations(run_dir: Path) -> list[dict]:
  """RUN/evaluations/*.json written by `memx eval` (and experiments): name, columns, curves."""
  out = []
  folder = run_dir / "evaluations"
  if folder.is_dir():
    for path in sorted(folder.glob("*.json")):
      d = _read_json(path)
      if d is not None and isinstance(d.get("columns"), dict):
        out.append({"name": str(d.get("name", path.stem)), "columns": d["columns"],
                    "curves": d.get("curves") if isinstance(d.get("curves"), dict) else {}})
  return out


def _fmt_eval(v: Any) -> str:
  if v is None:
    return MISSING
  if isinstance(v, bool) or not isinstance(v, int | float):
    return _cell(str(v))
  if isinstance(v, int):
    return str(v)
  return f"{v:.4g}"


def _evaluation_rows(runs: Sequence[_Run]) -> tuple[list[str], list[list[str]]]:
  evals = [(r.name, e) for r in runs for e in r.evaluations]
  keys = list(dict.fromkeys(k for _, e in evals for k in e["columns"]))
  rows = [[_cell(run), _cell(e["name"])] + [_fmt_eval(e["columns"].get(k)) for k in keys]
          for run, e in evals]
  return ["run", "evaluation", *keys], rows


def _curve_names(runs: Sequence[_Run]) -> list[str]:
  return list(dict.fromkeys(c for r in runs for e in r.evaluations for c in e["curves"]))


def _plot_curves(runs: Sequence[_Run], curve: str):
  """One line per evaluation of `curve` (y against x, e.g. accuracy against length)."""
  evals = [(r.name, e) for r in runs for e in r.evaluations if curve in e["curves"]]
  fig = _figure(6.5, 4.0)
  ax = fig.subplots()
  multi_run = len({run for run, _ in evals}) > 1
  for color, (run, e) in zip(_colors(len(evals)), evals, strict=True):
    c = e["curves"][curve]
    pts = [(x, y) for x, y in zip(c.get("x", []), c.get("y", []), strict=False)
           if isinstance(x, int | float) and isinstance(y, int | float)]
    if pts:
      xs, ys = zip(*pts, strict=True)
      label = f"{run}: {e['name']}" if multi_run else e["name"]
      ax.plot(xs, ys, marker="o", color=color, label=label)
  if evals:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(curve)
    ax.legend(fontsize=8)
  else:
    _no_data(ax, "no evaluations")
  ax.set_title(curve)
  return fig


def _curve_file(curve: str) -> str:
  return "eval-" + "".join(ch if ch.isalnum() else "-" for ch in curve.lower()) + ".png"


# ---------------------------------------------------------------------------------------------
# Tables

def _columns(runs: Sequence[_Run]) -> list[_Column]:
  def shown(c: _Column) -> bool:
    if c.header == "trainable":  # only where some run trains less than all its parameters
      return any(_number(r.summary, c.path) not in (None, _number(r.summary, ("params",)))
                 for r in runs)
    return c.header not in _OPTIONAL_COLUMNS or any(
        _number(r.summary, c.path) is not None for r in runs)
  return [c for c in _COLUMNS if shown(c)]


def _best(values: Sequence[float | None], better: str | None) -> float | None:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  # Bold only where there is a real choice: one value, or all equal, singles nobody out.
  if better is None or len(set(finite)) < 2:
    return None
  return min(finite) if better == "min" else max(finite)


def _comparison_rows(runs: Sequence[_Run], columns: Sequence[_Column], bold: bool):
  values = {c.header: [_number(r.summary, c.path) for r in runs] for c in columns}
  best = {c.header: _best(values[c.header], c.better) for c in columns}
  rows = []
  for i, run in enumerate(runs):
    row = [run.name, run.status]
    for c in columns:
      v = values[c.header][i]
      text = MISSING if v is None else c.fmt(v)
      if bold and v is not None and v == best[c.header]:
        text = f"**{text}**"
      row.append(text)
    rows.append(row)
  return rows


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _differing_config(runs: Sequence[_Run]) -> tuple[list[_Run], list[str]]:
  """Runs that have a config, and the dotted config keys whose values are not all the same."""
  with_cfg = [r for r in runs if r.config is not None]
  flat = [_flatten(r.config) for r in with_cfg]
  keys = list(dict.fromkeys(k for f in flat for k in f))
  absent = object()

  def canon(v):
    # JSON text compares lists, None and nested values by content; a missing key differs.
    return absent if v is absent else json.dumps(v, sort_keys=True, default=str)

  differing = [k for k in keys if len({canon(f.get(k, absent)) for f in flat}) > 1]
  return with_cfg, differing


def _fmt_config_value(v: Any) -> str:
  if isinstance(v, str):
    return v
  if v is None or isinstance(v, bool | int | float):
    return str(v)
  return json.dumps(v, default=str)


# ---------------------------------------------------------------------------------------------
# Plots

def _figure(width: float, height: float):
  import matplotlib
  # Reports are written on headless nodes. Switching backends closes pyplot's open figures, so
  # leave an already-imported pyplot alone; the Figure API below never needs a display anyway.
  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _colors(n: int) -> list:
  import matplotlib
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _no_data(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
  ax.set_xticks([])
  ax.set_yticks([])


def _series(metrics: Sequence[dict], split: str) -> tuple[list[float], list[float]]:
  """Steps and losses of one split; for a repeated step (a resumed run) the last record wins."""
  by_step = {}
  for rec in metrics:
    step, loss = _number(rec, ("step",)), _number(rec, ("loss",))
    if step is None or loss is None or not math.isfinite(loss):
      continue
    if rec.get("split", "train") == split:
      by_step[step] = loss
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _run_label(run: _Run) -> str:
  return run.name if run.status == "done" else f"{run.name} ({run.status})"


def _plot_loss(runs: Sequence[_Run]):
  from matplotlib.lines import Line2D
  from matplotlib.ticker import LogFormatter
  fig = _figure(9, 5)
  ax = fig.add_subplot()
  ax.set_title("Loss")
  handles, all_losses = [], []
  for run, color in zip(runs, _colors(len(runs)), strict=True):
    (ts, tl), (es, el) = _series(run.metrics, "train"), _series(run.metrics, "eval")
    if ts:
      ax.plot(ts, tl, color=color, lw=1.6)
    if es:
      ax.plot(es, el, color=color, lw=1.2, ls="--", marker="o", ms=4)
    if ts or es:
      handles.append(Line2D([], [], color=color, lw=2, label=_run_label(run)))
      all_losses += tl + el
  if not handles:
    _no_data(ax, "no losses logged")
    return fig
  lo, hi = min(all_losses), max(all_losses)
  # Losses spanning a decade or more are easier to compare on a log axis.
  if lo > 0 and hi / lo >= 10:
    ax.set_yscale("log")
    # Label the 2..9 ticks too: a loss axis spans one or two decades, so powers of ten alone
    # would leave only two or three labels.
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(3, 1.5)))
  ax.set_xlabel("step")
  ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
  ax.grid(True, alpha=0.3)
  handles += [Line2D([], [], color="0.3", lw=1.6, label="train"),
              Line2D([], [], color="0.3", lw=1.2, ls="--", marker="o", ms=4, label="eval")]
  # Outside the axes: the legend never hides a curve however many runs there are.
  fig.legend(handles=handles, loc="outside right upper", fontsize=8)
  return fig


def _barh_setup(ax, names: Sequence[str]) -> None:
  ax.set_yticks(range(len(names)), names)
  ax.invert_yaxis()  # first run on top, as in the tables
  ax.grid(True, axis="x", alpha=0.3)
  ax.set_axisbelow(True)


def _plot_memory(runs: Sequence[_Run]):
  import matplotlib
  kinds = [(label, key) for label, key in _MEMORY_KINDS
           if any(_number(r.summary, ("memory", key)) is not None for r in runs)]
  shown = [r for r in runs if any(_number(r.summary, ("memory", k)) is not None for _, k in kinds)]
  fig = _figure(9, 1.2 + 0.22 * max(len(kinds), 1) * max(len(shown), 1))
  ax = fig.add_subplot()
  ax.set_title("Training step memory (lower is better)")
  if not shown:
    _no_data(ax, "no memory measurements (no finished runs)")
    return fig
  vmax = max((v for r in shown for _, k in kinds
               if (v := _number(r.summary, ("memory", k))) is not None and math.isfinite(v)),
              default=0.0)
  # Plot in one binary unit so the axis ticks land on round numbers of it (10 MiB, not 9.5).
  unit, scale = "B", 1.0
  for name in ("KiB", "MiB", "GiB", "TiB"):
    if vmax >= scale * 1024:
      unit, scale = name, scale * 1024
  height = 0.8 / len(kinds)
  # A palette of its own, so a memory kind is never mistaken for a run's color elsewhere.
  palette = matplotlib.colormaps["Set2"]
  for j, (label, key) in enumerate(kinds):
    vals = [_number(r.summary, ("memory", key)) for r in shown]
    pos = [i + (j - (len(kinds) - 1) / 2) * height for i in range(len(shown))]
    bar_vals = [v / scale if v is not None and math.isfinite(v) else 0.0 for v in vals]
    bars = ax.barh(pos, bar_vals, height=height * 0.9, color=palette(j), label=label)
    ax.bar_label(bars, labels=[MISSING if v is None else _fmt_bytes(v) for v in vals],
                 padding=3, fontsize=7)
  _barh_setup(ax, [_run_label(r) for r in shown])
  ax.set_xlim(0, (vmax / scale or 1.0) * 1.22)  # room for the value labels
  ax.set_xlabel(unit)
  fig.legend(loc="outside right upper", fontsize=8)
  return fig


def _plot_throughput(runs: Sequence[_Run]):
  from matplotlib.ticker import FuncFormatter
  shown = [r for r in runs if _number(r.summary, ("tokens_per_s",)) is not None]
  fig = _figure(9, 1.2 + 0.45 * max(len(shown), 1))
  ax = fig.add_subplot()
  ax.set_title("Training throughput (higher is better)")
  if not shown:
    _no_data(ax, "no throughput measurements (no finished runs)")
    return fig
  vals = [_number(r.summary, ("tokens_per_s",)) for r in shown]
  bar_vals = [v if math.isfinite(v) else 0.0 for v in vals]
  colors = dict(zip([r.name for r in runs], _colors(len(runs)), strict=True))
  bars = ax.barh(range(len(shown)), bar_vals, height=0.6, color=[colors[r.name] for r in shown])
  ax.bar_label(bars, labels=[_fmt_rate(v) for v in vals], padding=3, fontsize=8)
  _barh_setup(ax, [_run_label(r) for r in shown])
  ax.set_xlim(0, (max(bar_vals) or 1.0) * 1.18)
  ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _fmt_count(x)))
  ax.set_xlabel("tokens / s")
  return fig


# ---------------------------------------------------------------------------------------------
# Output

def _save_figure(fig, path: Path) -> None:
  with atomic_file(path, "wb") as f:
    fig.savefig(f, format="png")


def _status_counts(runs: Sequence[_Run]) -> str:
  """"2 done, 1 failed", always naming done and failed, then any other statuses present."""
  counts = {"done": 0, "failed": 0}
  for r in runs:
    counts[r.status] = counts.get(r.status, 0) + 1
  return ", ".join(f"{v} {k}" for k, v in counts.items())


def _render(sweep_dir: Path, runs: Sequence[_Run]) -> str:
  n = len(runs)
  out = [f"# Sweep report: {sweep_dir.name}", "",
         f"{n} run{'s' if n != 1 else ''}: {_status_counts(runs)}.", "", "## Comparison", "",
         "Best value per column in **bold**: lowest loss, perplexity, memory and checkpoint "
         "size; highest task accuracy and tokens/s. Losses are in nats per token; memory is XLA's "
         "analysis of the compiled training step (of the distillation step, teacher included, "
         "for a distilled entry, whose eval numbers are on its teacher's eval rows); a run "
         f"without a summary of its current config shows {MISSING}.", ""]
  columns = _columns(runs)
  header = ["run", "status"] + [c.header for c in columns]
  rows = [[_cell(r[0]), *r[1:]] for r in _comparison_rows(runs, columns, bold=True)]
  out += [_md_table(header, rows, right=set(range(2, len(header)))), ""]

  failed = [r for r in runs if r.status == "failed" or r.error]
  if failed:
    out += ["### Failed runs", ""]
    for r in failed:
      err = r.error or "(no error recorded)"
      if len(err) > _ERROR_CHARS:
        err = err[:_ERROR_CHARS - 1] + "…"
      out.append(f"- **{_cell(r.name)}** ({r.status}): {_cell(err)}")
    out.append("")

  if any(r.evaluations for r in runs):
    header, rows = _evaluation_rows(runs)
    out += ["## Evaluations", "",
            "Trained runs evaluated as they are or under sparse plans (`memx eval`, "
            "RUN/evaluations/*.json); @max = at the longest evaluated length.", "",
            _md_table(header, rows, right=set(range(2, len(header)))), ""]
    for curve in _curve_names(runs):
      out += [f"![{curve}]({_curve_file(curve)})", ""]

  out += ["## What differs", ""]
  with_cfg, keys = _differing_config(runs)
  if not keys:
    out.append("All runs share the same config." if len(with_cfg) > 1 else
               "Fewer than two runs have a config.json; nothing to compare.")
  else:
    out += ["Config fields whose values differ between runs; all other fields are shared.", ""]
    rows = []
    for r in with_cfg:
      flat = _flatten(r.config)
      rows.append([_cell(r.name)] + [
          _cell(_fmt_config_value(flat[k])) if k in flat else MISSING for k in keys])
    out.append(_md_table(["run", *keys], rows, right=set()))
  out.append("")

  out += ["## Plots", "",
          "### Loss", "",
          "Training loss (solid) and evaluation loss (dashed, dots) per run.", "",
          f"![Loss curves]({PLOTS['loss']})", "",
          "### Memory", "",
          f"![Memory per run]({PLOTS['memory']})", "",
          "### Throughput", "",
          f"![Tokens per second per run]({PLOTS['throughput']})", ""]
  return "\n".join(out)


def write_report(sweep_dir: str | os.PathLike) -> Path:
  """Write DIR/report.md (tables) and DIR/{loss,memory,throughput}.png; return report.md's path.

  Raises UserError when the directory is missing or holds no runs.
  """
  sweep_dir = Path(sweep_dir)
  runs = _load_runs(sweep_dir)
  for key, plot in (("loss", _plot_loss), ("memory", _plot_memory),
                    ("throughput", _plot_throughput)):
    _save_figure(plot(runs), sweep_dir / PLOTS[key])
  for curve in _curve_names(runs):
    _save_figure(_plot_curves(runs, curve), sweep_dir / _curve_file(curve))
  # The Markdown goes last so that its image links never point at plots not yet written.
  path = sweep_dir / REPORT_NAME
  text = _render(sweep_dir, runs)
  with atomic_file(path, "wb") as f:
    f.write(text.encode())
  return path


def summary_table(sweep_dir: str | os.PathLike) -> str:
  """A short plain-text table (run, status, eval loss, task acc, tokens/s, temp mem)."""
  runs = _load_runs(Path(sweep_dir))
  columns = [c for c in _COLUMNS if c.header in _SUMMARY_COLUMNS]
  header = ["run", "status"] + [c.header for c in columns]
  rows = _comparison_rows(runs, columns, bold=False)
  return _text_table(header, rows, right=set(range(2, len(header))))
