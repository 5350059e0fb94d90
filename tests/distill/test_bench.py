"""scripts/bench_distill.py and memx.distill.speed: a tiny end-to-end run, constant decode state."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from memx.distill.config import StudentConfig
from memx.distill.seed import student_model_config
from memx.distill.speed import best_of_modes, markdown, summarize
from memx.models.config import ModelConfig
from memx.models.decode import cache_bytes
from memx.models.transformer import TransformerLM

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_linear_student_decode_state_is_constant_in_length():
  from flax import nnx
  teacher = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
  sizes = {}
  for name, cfg in (("teacher", teacher),
                    ("linear", student_model_config(teacher, StudentConfig())),
                    ("hybrid", student_model_config(teacher, StudentConfig(kind="hybrid",
                                                                           every=2)))):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    sizes[name] = [cache_bytes(model.init_cache(1, n)) for n in (256, 4096)]
  assert sizes["linear"][0] == sizes["linear"][1]
  assert sizes["teacher"][1] > 10 * sizes["teacher"][0]
  assert sizes["teacher"][1] > sizes["hybrid"][1] > sizes["linear"][1]


def test_summary_finds_crossover_and_ratio():
  rows = [{"model": m, "length": n, "prefill_s": t, "prefill_bytes": b, "state_bytes": s,
           "decode_s": 1.0, "prefill_status": "ok"}
          for m, n, t, b, s in (("teacher", 1, 1.0, 100, 10), ("linear", 1, 2.0, 100, 1),
                                ("teacher", 4, 8.0, 400, 40), ("linear", 4, 2.0, 100, 1),
                                ("linear", 16, 4.0, 100, 1))]
  (line,) = summarize(rows, ["teacher", "linear"])
  assert "crossover at L = 4" in line and "4.00x faster" in line and "75.0% less" in line
  assert "| 16 | linear |" in markdown(rows, ["teacher", "linear"])
  # Memory-only rows (compiled, never run): the ratios at the longest length both compiled.
  untimed = [{k: v for k, v in r.items() if k not in ("prefill_s", "decode_s")} for r in rows]
  (line,) = summarize(untimed, ["teacher", "linear"])
  assert line == ("linear: at L = 4 (compiled, not run): 75.0% less prefill memory, "
                  "97.5% smaller decode state")


def test_best_of_modes_pairs_fastest_with_fastest_and_leanest_with_leanest():
  """A slow chunked teacher must not flatter the student: times compare each model's fastest
  mode, memory each model's leanest, at the longest length the teacher ran in every mode."""
  def rows(spec):
    return [{"model": m, "length": n, "prefill_s": t, "prefill_bytes": b}
            for m, n, t, b in spec]
  by_mode = {"whole": rows((("teacher", 8, 1.0, 800), ("linear", 8, 0.25, 700),
                            ("linear", 16, 0.5, 1400))),
             "in chunks of 2": rows((("teacher", 8, 20.0, 400), ("linear", 8, 0.5, 80),
                                     ("linear", 16, 1.0, 80)))}
  (line,) = best_of_modes(by_mode, ["teacher", "linear"])
  assert line.startswith("best of each mode: linear at L = 8: ")
  assert "fastest prefill 4.00x faster (teacher whole 1000.0 ms, linear whole 250.0 ms)" in line
  assert "leanest prefill 80.0% less memory (teacher in chunks of 2" in line
  assert best_of_modes({"whole": by_mode["whole"]}, ["teacher", "linear"]) == []


@pytest.mark.slow  # ten small compiles: ~15 s on 2 cores
def test_bench_tiny_end_to_end(tmp_path, load_script):
  bench = load_script("scripts/bench_distill.py")
  assert bench.main(["--out", str(tmp_path), "--d-model", "32", "--n-layers", "2",
                     "--n-heads", "2", "--n-kv-heads", "1", "--dtype", "float32",
                     "--lengths", "32,64", "--teacher-max", "32", "--chunk", "16",
                     "--repeats", "1", "--budget-s", "0.1"]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  rows = {(r["model"], r["length"]): r for r in results["rows"]}
  assert set(rows) == {("teacher", 32), ("linear", 32), ("hybrid2", 32), ("linear", 64),
                       ("hybrid2", 64)}
  assert all(r["prefill_status"] == "ok" and r["prefill_s"] > 0 for r in rows.values())
  assert rows[("linear", 32)]["state_bytes"] == rows[("linear", 64)]["state_bytes"]
  assert "crossover" in (tmp_path / "results.md").read_text()
  # Chunked prefill, compiled only, with the XLA:CPU flags the script's docstring gives for
  # memory (a child process: XLA reads them at start-up): the linear student's prefill memory
  # stays flat from 64 to 256 tokens in chunks of 32, while the whole prefill's grows.
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false "
                                   "--xla_cpu_experimental_ynn_fusion_type=")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  subprocess.run([sys.executable, str(ROOT / "scripts/bench_distill.py"), "--out",
                  str(tmp_path), "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
                  "--n-kv-heads", "1", "--dtype", "float32", "--lengths", "64,256", "--chunk",
                  "16", "--prefill-chunks", "whole,32", "--memory-only"],
                 check=True, env=env, capture_output=True, timeout=300)
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  mem = {(r["model"], r["length"], r["prefill_chunk"]): r["prefill_bytes"] for r in rows}
  assert all("prefill_s" not in r for r in rows)
  assert mem[("linear", 256, 32)] < 1.01 * mem[("linear", 64, 32)]
  assert mem[("linear", 256, None)] > 2 * mem[("linear", 64, None)]
  assert mem[("teacher", 256, 32)] > mem[("teacher", 64, 32)]  # its KV cache grows
  assert "in chunks of 32" in (tmp_path / "results.md").read_text()
