"""`memx generate`: greedy text from a trained run, the same with a draft run (speculative),
sampled rows, JSON output, and refusals before any weights load."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from memx.cli import main
from memx.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from memx.data.tokenizer import ByteTokenizer
from memx.experiment.rundir import write_config
from memx.models.decode import generate
from memx.train.loop import train
from memx.train.restore import load_trained

TARGET = Config(
    model=ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=32),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=30, batch_size=8, log_every=10, eval_batches=1),
    checkpoint=CheckpointConfig(every=30, keep=1),
)
DRAFT = dataclasses.replace(TARGET, model=ModelConfig(vocab_size=264, d_model=32, n_layers=1,
                                                      n_heads=2, mixers=("mamba2",)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  for name, cfg in (("target", TARGET), ("draft", DRAFT)):
    (root / name).mkdir()
    write_config(root / name, cfg)
    train(cfg, root / name, progress=False)
  return root / "target", root / "draft"


def test_greedy_text_with_and_without_a_draft(runs, tmp_path, capsys):
  target, draft = runs
  prompt = "The cat "
  assert main(["generate", str(target), "--prompt", prompt, "--max-new-tokens", "12",
               "--json", str(tmp_path / "plain.json")]) == 0
  plain = json.loads((tmp_path / "plain.json").read_text())
  ids = ByteTokenizer().encode(prompt)
  want = generate(load_trained(target).model, jnp.asarray(ids[None]), 12)
  np.testing.assert_array_equal(plain["tokens"][0], np.asarray(want[0, len(ids):]))
  assert plain["text"][0] == ByteTokenizer().decode(want[0, len(ids):])
  assert capsys.readouterr().out.startswith(plain["text"][0])
  assert main(["generate", str(target), "--prompt", prompt, "--max-new-tokens", "12",
               "--draft", str(draft), "--draft-len", "3", "--time",
               "--json", str(tmp_path / "spec.json")]) == 0
  spec = json.loads((tmp_path / "spec.json").read_text())
  assert spec["tokens"] == plain["tokens"]
  assert spec["drafted"] == 3 * spec["target_passes"]
  assert spec["target_passes"] + spec["accepted"] >= 11
  assert spec["tokens_per_s"] > 0 and not spec["compile_included"]
  assert plain["compile_included"] and "tokens_per_s" not in plain
  assert "tokens/s; " in capsys.readouterr().out


def test_sampled_rows_and_prompt_ids(runs, tmp_path, capsys):
  target, draft = runs
  assert main(["generate", str(target), "--prompt-ids", "257,84,104", "--temperature", "0.8",
               "--samples", "3", "--max-new-tokens", "5", "--draft", str(draft),
               "--json", str(tmp_path / "s.json")]) == 0
  out = json.loads((tmp_path / "s.json").read_text())
  assert len(out["tokens"]) == 3 and all(len(r) == 5 for r in out["tokens"])
  assert out["prompt_ids"] == [257, 84, 104]
  assert capsys.readouterr().out.startswith("[0] ")


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--draft-len", "2"], "need --draft"),
    (["--prompt-ids", "1,999"], r"ids in \[0, 264\)"),
    (["--prompt-ids", "a,b"], "comma-separated integers"),
    (["--prompt", ""], "empty"),
])
def test_bad_arguments_are_refused(runs, argv, match, capsys):
  target, _ = runs
  assert main(["generate", str(target), *argv]) == 2
  assert re.search(match, capsys.readouterr().err)


def test_a_draft_over_another_vocabulary_is_refused(runs, tmp_path, capsys):
  target, _ = runs
  other = tmp_path / "other"
  other.mkdir()
  write_config(other, dataclasses.replace(
      DRAFT, model=dataclasses.replace(DRAFT.model, vocab_size=300)))
  assert main(["generate", str(target), "--prompt", "x", "--draft", str(other)]) == 2
  assert "vocabulary (300)" in capsys.readouterr().err
