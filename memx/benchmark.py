"""One output rule for scripts/bench_*.py: results.json and a Markdown table of its rows."""

import datetime
import json
import os
import pathlib

import jax


def write_results(out: str | os.PathLike, title: str, settings: dict, rows: list[dict]) -> str:
  """Writes OUT/results.json (date, device, jax version, settings, rows) and OUT/results.md (one
  table row per dict); each file appears whole or not at all. Returns the Markdown."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "settings": settings, "rows": rows}
  keys = list(rows[0]) if rows else []
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  md = "\n".join([f"# {title} ({result['device']}, {result['date']})", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                 + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]) + "\n"
  for name, text in (("results.json", json.dumps(result, indent=2)), ("results.md", md)):
    tmp = out / f"{name}.tmp"
    tmp.write_text(text)
    tmp.replace(out / name)
  return md
