"""`memx quantize`: a quantized model written as a run of its own restores to the same model,
evaluates, and serves as the base of a LoRA fine-tune whose quantized weights stay frozen."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from memx.cli import main
from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  FinetuneConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)
from memx.errors import ConfigError
from memx.experiment.rundir import write_config
from memx.nn.lora import LoRAWeight
from memx.nn.quantized import IntQWeight, Quantized
from memx.quant.config import WeightQuant
from memx.quant.model import quantize_model
from memx.train.loop import train
from memx.train.restore import load_trained

BASE = Config(
    model=ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=16),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=4, batch_size=8, log_every=1, eval_batches=1),
    checkpoint=CheckpointConfig(every=4, keep=1),
)
SPEC = "gptq:4:64:2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("quantized")
  base = root / "base"
  base.mkdir()
  write_config(base, BASE)
  train(BASE, base, progress=False)
  assert main(["quantize", str(base), "--weight-quant", SPEC, "--out", str(root / "q"),
               "--batch-size", "4"]) == 0
  return base, root / "q"


def test_the_quantized_run_restores_the_quantized_model(runs):
  base, q = runs
  cfg = json.loads((q / "config.json").read_text())
  assert cfg["model"]["weight_quant"] == SPEC
  summary = json.loads((q / "summary.json").read_text())
  assert summary["status"] == "done" and summary["weight_quant"]["bits_per_weight"] == 5.0
  restored = load_trained(q).model
  assert isinstance(restored.blocks[1].mlp.w_down, IntQWeight)
  # the same quantization done in memory, on the same calibration rows
  from memx.data import make_loader
  want = load_trained(base).model
  loader = make_loader(BASE.data, batch_size=4, seed=BASE.train.seed, split="train")
  quantize_model(want, WeightQuant.parse(SPEC), [loader.local_batch(i) for i in range(2)],
                 log=lambda *_: None)
  tokens = jax.numpy.asarray(loader.local_batch(0)["inputs"])
  np.testing.assert_array_equal(restored(tokens), want(tokens))


def test_the_quantized_run_evaluates(runs):
  _, q = runs
  assert main(["eval", str(q), "--lengths", "128", "--depths", "0.5", "--batches", "1",
               "--batch-size", "2"]) == 0
  assert np.isfinite(json.loads((q / "evaluations" / "dense.json").read_text())
                     ["eval_loss"]["128"])


def test_lora_on_the_quantized_weights(runs, tmp_path):
  _, q = runs
  cfg = dataclasses.replace(
      BASE, model=dataclasses.replace(BASE.model, weight_quant=SPEC),
      finetune=FinetuneConfig(base=str(q), lora_rank=2), train=dataclasses.replace(
          BASE.train, steps=3))
  run = tmp_path / "ft"
  run.mkdir()
  write_config(run, cfg)
  train(cfg, run, progress=False)
  tuned = load_trained(run).model
  w = tuned.blocks[0].attn.wq
  assert isinstance(w, LoRAWeight) and isinstance(w.base, IntQWeight)
  assert np.abs(np.asarray(w.b[...])).max() > 0
  # (an adapted weight holds the quantized one as its base)
  frozen = lambda m: {jax.tree_util.keystr(p).replace("['base']", ""): np.asarray(x)  # noqa: E731
                      for p, x in jax.tree_util.tree_flatten_with_path(
                          nnx.state(m, Quantized))[0]}
  start, end = frozen(load_trained(q).model), frozen(tuned)
  assert start.keys() == end.keys() and start
  for k in start:
    np.testing.assert_array_equal(end[k], start[k], err_msg=k)
  plain = dataclasses.replace(cfg, model=BASE.model)
  from memx.train.loop import prepare
  with pytest.raises(ConfigError, match="gives its projections as"):
    prepare(plain)
  # quantized projections are frozen: without adapters nothing of them would train
  frozen_run = dataclasses.replace(cfg, finetune=FinetuneConfig(base=str(q)))
  with pytest.raises(ConfigError, match="not allowed without finetune.base and"):
    prepare(frozen_run)
  twice = dataclasses.replace(cfg, finetune=FinetuneConfig(base=str(q), lora_rank=2,
                                                           quantize_base="nf4"))
  with pytest.raises(ConfigError, match="quantized already"):
    prepare(twice)
  # params count the weights the quantized bases store, adapters on top
  summary = json.loads((run / "summary.json").read_text())
  n_adapters = sum(x.size for x in jax.tree.leaves(nnx.state(tuned, nnx.LoRAParam)))
  base_summary_params = sum(x.size for x in jax.tree.leaves(nnx.state(load_trained(
      runs[0]).model, nnx.Param)))
  assert summary["params"] == base_summary_params + n_adapters
  # a LoRA run over the quantized one is merged into plain weights as a base
  chained = dataclasses.replace(BASE, finetune=FinetuneConfig(base=str(run), lora_rank=2))
  from memx.train.step import init_state
  init_state(chained, jax.random.key(0))


def test_a_quantized_teacher_is_dequantized_for_distillation(runs, tmp_path):
  from memx.distill.config import DistillConfig, StudentConfig
  from memx.distill.runner import initial_student, plan

  _, q = runs
  teacher = load_trained(q).model
  p = plan(q, DistillConfig(student=StudentConfig(kind="hybrid", every=2)), tmp_path / "d")
  student, _ = initial_student(p, log=lambda *_: None)
  np.testing.assert_array_equal(student.blocks[0].attn.wq[...], teacher.blocks[0].attn.wq[...])
  np.testing.assert_array_equal(student.blocks[1].mlp.w_up[...], teacher.blocks[1].mlp.w_up[...])


def test_bad_requests_fail_before_any_work(runs, tmp_path, capsys):
  base, q = runs
  assert main(["quantize", str(base), "--weight-quant", SPEC, "--out", str(q)]) == 2
  assert "exists" in capsys.readouterr().err
  assert main(["quantize", str(q), "--weight-quant", SPEC, "--out", str(tmp_path / "qq")]) == 2
  assert "already quantized" in capsys.readouterr().err
  assert main(["quantize", str(base), "--weight-quant", "rtn:4:48",
               "--out", str(tmp_path / "q2")]) == 2
  assert "not a whole number of groups of 48" in capsys.readouterr().err
  assert not (tmp_path / "q2").exists() and list(tmp_path.iterdir()) == []
  half = tmp_path / "half"
  half.mkdir()
  write_config(half, BASE)
  train(BASE, half, progress=False, stop_at_step=2)  # unfinished: no quantized run from it
  assert main(["quantize", str(half), "--weight-quant", "rtn:4:64",
               "--out", str(tmp_path / "q3")]) == 2
  assert "has not finished training" in capsys.readouterr().err
  assert main(["quantize", str(half), "--weight-quant", "rtn:4:64", "--step", "2",
               "--out", str(tmp_path / "q3")]) == 0
  # its identity covers the source, spec, step and calibration: fine-tunes see a change
  from memx.train.finetune import base_hash
  assert main(["quantize", str(base), "--weight-quant", SPEC, "--batch-size", "2",
               "--out", str(tmp_path / "q4")]) == 0
  assert len({base_hash(str(d)) for d in (q, tmp_path / "q3", tmp_path / "q4")}) == 3
  with pytest.raises(ConfigError, match="model.weight_quant = 'gptq:5:64'"):
    ModelConfig(weight_quant="gptq:5:64")
