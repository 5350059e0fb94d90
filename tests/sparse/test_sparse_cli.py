"""`memx sparse ...` and `memx eval` end to end on a tiny trained run, and their errors."""

import json

from memx.cli import main
from memx.sparse.profile import Profile
from memx.sparse.validate import choose


def test_pipeline_end_to_end(tiny_run, tmp_path, capsys):
  prof = tmp_path / "profile.npz"
  assert main(["sparse", "profile", str(tiny_run), "--lengths", "32,64", "--out", str(prof),
               "--batches", "1", "--batch-size", "2", "--block", "16"]) == 0
  # The run trains on corpus + MQAR: by default the profile calibrates on the task's rows alone.
  assert Profile.load(prof).meta["calibration"] == "mqar"
  mix = tmp_path / "mix.npz"
  assert main(["sparse", "profile", str(tiny_run), "--lengths", "32", "--out", str(mix),
               "--batches", "1", "--batch-size", "2", "--block", "16",
               "--calibration", "train"]) == 0
  assert Profile.load(mix).meta["calibration"] == "corpus"
  plan = tmp_path / "moa.json"
  assert main(["sparse", "search", str(prof), "--budget", "0.5", "--n-sink", "2",
               "--out", str(plan)]) == 0
  out = capsys.readouterr().out
  assert "moa plan for 2 layers × 4 heads" in out and "milp" in out
  d = json.loads(plan.read_text())
  assert all(v <= 0.5 for v in d["predicted_density"].values())
  checked = tmp_path / "moa_validated.json"  # MoA's validation on the run's model at N = 128
  assert main(["sparse", "search", str(prof), "--budget", "0.5", "--n-sink", "2",
               "--validate", str(tiny_run), "--validate-length", "128", "--pareto-points", "3",
               "--validate-batches", "1", "--validate-batch-size", "2", "--measure-heads",
               "--guard-tolerance", "0.5", "--out", str(checked)]) == 0
  out = capsys.readouterr().out
  assert "Pareto plans at N = 128 on mqar rows" in out and "guard: corpus loss within 0.5" in out
  v = json.loads(checked.read_text())["meta"]["validation"]
  assert v["length"] == 128 and v["guard"]["tolerance"] == 0.5
  assert (v["chosen"], v["guard"]["met"]) == choose(v["candidates"], 0.5, v["guard"]["dense_loss"])
  capped = tmp_path / "moa_kv.json"   # the same search under a KV-memory cap (2 KV heads)
  assert main(["sparse", "search", str(prof), "--budget", "0.5", "--n-sink", "2",
               "--kv-budget", "0.45", "--out", str(capped)]) == 0
  saved = json.loads(capped.read_text())
  assert saved["meta"]["kv_budget"] == [0.45, 0.45] and saved["kv_heads"] == 2
  assert all(f <= 0.45 + 1e-12 for f in saved["predicted_kv_fraction"].values())
  capsys.readouterr()
  assert main(["sparse", "show", str(capped)]) == 0
  assert "of dense (2 KV heads per layer" in capsys.readouterr().out
  uni = tmp_path / "uniform.json"
  assert main(["sparse", "baseline", str(tiny_run), "--kind", "uniform", "--budget", "0.5",
               "--lengths", "32,64", "--out", str(uni)]) == 0
  assert main(["sparse", "show", str(uni)]) == 0
  for name, p in (("moa", plan), ("uniform", uni)):
    assert main(["eval", str(tiny_run), "--plan", str(p), "--name", name, "--lengths", "128",
                 "--depths", "0.5", "--batches", "1", "--batch-size", "2"]) == 0
  assert main(["eval", str(tiny_run), "--lengths", "128", "--depths", "0.5", "--batches", "1",
               "--batch-size", "2"]) == 0
  result = json.loads((tiny_run / "evaluations" / "moa.json").read_text())
  assert result["method"] == "moa" and "passkey accuracy" in result["curves"]
  dense = json.loads((tiny_run / "evaluations" / "dense.json").read_text())
  assert result["kv_bytes_per_token"]["128"] < dense["kv_bytes_per_token"]["128"]
  assert main(["report", str(tiny_run.parent)]) == 0
  report = (tiny_run.parent / "report.md").read_text()
  assert "## Evaluations" in report and "| dense | moa |" in report
  assert (tiny_run.parent / "eval-passkey-accuracy.png").is_file()


def test_eval_with_a_quantized_kv_cache(tiny_run, capsys):
  """`memx eval --kv-quant`: every row through the decode path, against the dense forward."""
  args = ["eval", str(tiny_run), "--lengths", "128", "--depths", "0.5", "--batches", "1",
          "--batch-size", "2"]
  assert main(args + ["--name", "dense-ref"]) == 0
  for bits in ("8", "2:16"):
    assert main(args + ["--kv-quant", bits]) == 0
  assert "kv2g16:" in capsys.readouterr().out
  read = lambda name: json.loads((tiny_run / "evaluations" / f"{name}.json").read_text())
  dense, kv8, kv2 = read("dense-ref"), read("kv8g32"), read("kv2g16")
  assert kv8["kv_quant"] == {"bits": 8, "group": 32, "residual": 0} and dense["kv_quant"] is None
  # 8-bit codes: the decode path's loss and answers as the forward's; 2-bit moves the loss.
  assert abs(kv8["eval_loss"]["128"] - dense["eval_loss"]["128"]) < 2e-3
  assert kv8["mqar"]["128"] == dense["mqar"]["128"]
  assert kv8["passkey_digits"]["128"] == dense["passkey_digits"]["128"]
  assert abs(kv2["eval_loss"]["128"] - dense["eval_loss"]["128"]) > \
      abs(kv8["eval_loss"]["128"] - dense["eval_loss"]["128"])
  kv = [r["kv_bytes_per_token"]["128"] for r in (dense, kv8, kv2)]
  assert kv[0] > kv[1] > kv[2]
  assert main(args + ["--kv-quant", "3"]) == 2
  assert "bits must be one of" in capsys.readouterr().err
  assert main(args + ["--kv-quant", "4", "--plan", "any.json"]) == 2
  assert "ring caches are not quantized" in capsys.readouterr().err


def test_eval_with_h2o_caches(tiny_run, capsys):
  """`memx eval --kv-evict`: a budget holding every token is the dense cache; a small one
  holds fewer bytes per token."""
  args = ["eval", str(tiny_run), "--lengths", "128", "--depths", "0.5", "--batches", "1",
          "--batch-size", "2"]
  assert main(args + ["--name", "dense-ref"]) == 0
  for spec in ("64:64", "8:8"):
    assert main(args + ["--kv-evict", spec]) == 0
  read = lambda name: json.loads((tiny_run / "evaluations" / f"{name}.json").read_text())
  dense, whole, small = read("dense-ref"), read("h2o64+64"), read("h2o8+8")
  assert whole["kv_evict"] == {"heavy": 64, "recent": 64, "observe": 0, "pool": 1}
  assert dense["kv_evict"] is None
  assert abs(whole["eval_loss"]["128"] - dense["eval_loss"]["128"]) < 2e-3
  assert whole["mqar"]["128"] == dense["mqar"]["128"]
  assert small["kv_bytes_per_token"]["128"] < 0.2 * dense["kv_bytes_per_token"]["128"]
  capsys.readouterr()
  assert main(args + ["--kv-evict", "8"]) == 2
  assert "expected HEAVY:RECENT" in capsys.readouterr().err
  assert main(args + ["--kv-evict", "8:8", "--kv-quant", "4"]) == 2
  assert "evaluated alone" in capsys.readouterr().err


def test_errors_are_one_paragraph(tiny_run, tmp_path, capsys):
  assert main(["sparse", "search", str(tmp_path / "none.npz"), "--budget", "0.5",
               "--out", str(tmp_path / "p.json")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert main(["sparse", "baseline", str(tiny_run), "--kind", "uniform", "--budget", "1.5",
               "--lengths", "32", "--out", str(tmp_path / "u.json")]) == 2
  assert "(0, 1]" in capsys.readouterr().err
  assert not (tmp_path / "u.json").exists()
  prof = tmp_path / "profile.npz"
  assert main(["sparse", "profile", str(tiny_run), "--lengths", "32", "--out", str(prof),
               "--batches", "1", "--batch-size", "2", "--block", "16"]) == 0
  assert main(["sparse", "search", str(prof), "--budget", "0.5", "--validate", str(tiny_run),
               "--pareto-points", "0", "--out", str(tmp_path / "v.json")]) == 2
  assert "--pareto-points" in capsys.readouterr().err
  assert main(["sparse", "search", str(prof), "--budget", "0.5", "--measure-heads",
               "--out", str(tmp_path / "v.json")]) == 2
  assert "--guard-tolerance need --validate" in capsys.readouterr().err
  assert not (tmp_path / "v.json").exists()
  assert main(["sparse", "profile", str(tmp_path), "--lengths", "32", "--out",
               str(tmp_path / "x.npz")]) == 2
  assert "not a memx run" in capsys.readouterr().err
  bad = tmp_path / "other.json"
  bad.write_text(json.dumps({"version": 1, "kind": "dense", "fingerprint": "0", "n_layers": 3,
                             "n_heads": 4, "lengths": [32], "budget": None,
                             "layers": [None, None, None]}))
  assert main(["eval", str(tiny_run), "--plan", str(bad), "--lengths", "128"]) == 2
  assert "3 layers × 4 heads" in capsys.readouterr().err
  assert main(["eval", str(tiny_run), "--lengths", "96", "--batches", "1"]) == 2
  assert "too short for the 'passkey' task" in capsys.readouterr().err
  assert main(["sparse", "search", str(tmp_path / "none.npz"), "--budget", "x",
               "--out", "p.json"]) == 2


def test_run_with_plan(tiny_run, tmp_path, capsys):
  """`memx run --plan` trains the experiment's model under the plan's per-head masks."""
  exp = tmp_path / "exp.py"
  # The experiment rebuilds the tiny run's config from its config.json (importing this
  # directory's conftest would collide with other conftest modules under xdist).
  cfg_file = tiny_run / "config.json"
  exp.write_text("import json\nfrom memx.config import from_dict\n\n"
                 "def config(variant='base'):\n"
                 f"  return from_dict(json.load(open({str(cfg_file)!r})))\n")
  plan = tmp_path / "uniform.json"
  assert main(["sparse", "baseline", str(tiny_run), "--kind", "uniform", "--budget", "0.3",
               "--lengths", "64", "--out", str(plan)]) == 0
  args = ["run", str(exp), "--plan", str(plan), "--workdir", str(tmp_path / "runs"),
          "--set", "train.steps=2", "--set", "checkpoint.every=2", "--set", "train.eval_batches=1"]
  assert main(args) == 0
  cfg = json.loads((tmp_path / "runs" / "exp" / "config.json").read_text())
  assert cfg["model"]["attn_plan"][0][0][2] == 4  # the plan's sinks reached the config
  other = tmp_path / "other.json"
  d = json.loads(plan.read_text())
  d["fingerprint"] = "0" * 16
  other.write_text(json.dumps(d))
  assert main([*args[:3], str(other), "--workdir", str(tmp_path / "runs2")]) == 2
  assert "another model" in capsys.readouterr().err
  assert not (tmp_path / "runs2").exists()


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
  # Each used to run the whole computation (or crash deep in it): refused up front now, with
  # a run path that does not even exist, so nothing was loaded.
  out_dir = tmp_path / "existing"
  out_dir.mkdir()
  missing = str(tmp_path / "no-run")
  cases = [
      (["sparse", "profile", missing, "--lengths", "32", "--out", str(out_dir)], "is a directory"),
      (["sparse", "search", missing, "--budget", "0.5", "--out", str(out_dir)], "is a directory"),
      (["sparse", "baseline", missing, "--kind", "uniform", "--budget", "0.5", "--lengths", "32",
        "--out", str(tmp_path / "p.json"), "--n-sink", "-2"], "--n-sink -2"),
      (["eval", missing, "--lengths", "32", "--batches", "0"], "--batches 0"),
  ]
  for argv, fragment in cases:
    assert main(argv) == 2, argv
    assert fragment in capsys.readouterr().err, argv
  assert not (tmp_path / "p.json").exists()


def test_eval_with_quantized_weights(tiny_run, capsys):
  """`memx eval --weight-quant`: 4-bit GPTQ and RTN stay near the dense loss, at exactly
  4 + 64/32 bits per weight (a float32 scale and zero per 32 rows); at 2 bits GPTQ's error
  compensation beats round-to-nearest."""
  args = ["eval", str(tiny_run), "--lengths", "128", "--depths", "0.5", "--batches", "1",
          "--batch-size", "4"]
  assert main(args + ["--name", "dense-wq"]) == 0
  for spec in ("gptq:4:32:2", "rtn:4:32", "gptq:2:32:4", "rtn:2:32"):
    assert main(args + ["--weight-quant", spec]) == 0
  read = lambda name: json.loads((tiny_run / "evaluations" / f"{name}.json").read_text())
  dense = read("dense-wq")["eval_loss"]["128"]
  g4, r4, g2, r2 = (read(n) for n in ("gptq-w4g32-c2", "rtn-w4g32", "gptq-w2g32-c4",
                                      "rtn-w2g32"))
  assert g4["weight_quant"]["bits_per_weight"] == 6.0 == g4["columns"]["weight bits"]
  assert g4["weight_quant"]["method"] == "gptq" and g4["weight_quant"]["calib_batches"] == 2
  for r in (g4, r4):
    assert abs(r["eval_loss"]["128"] - dense) < 0.1, (r["eval_loss"], dense)
  assert g2["eval_loss"]["128"] < r2["eval_loss"]["128"]
  errors = g2["weight_quant"]["relative_output_error"]
  assert set(errors) == {f"{i}.{n}" for i in (0, 1)
                         for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
  capsys.readouterr()
  assert main(args + ["--weight-quant", "gptq:5:32"]) == 2
  assert "bits = 5 is not one of" in capsys.readouterr().err
  assert main(args + ["--weight-quant", "rtn:4:48"]) == 2
  assert "not a whole number of groups of 48" in capsys.readouterr().err
  assert main(args + ["--weight-quant", "nf4"]) == 2  # d_model 32: K below NF4's block of 64
  assert "not a whole number of groups of 64" in capsys.readouterr().err
