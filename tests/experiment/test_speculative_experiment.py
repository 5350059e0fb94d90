"""experiments/speculative/pipeline.py: every model variant validates over the same vocabulary,
and the tiny pipeline (train the target, then drafts on the data and distilled from the target;
greedy rows checked against generate, timing) runs end to end."""

import json

from memx.experiment import loading
from memx.train.loop import check_data

EXPERIMENT = "experiments/speculative/pipeline.py"


def test_variants_share_the_vocabulary():
  module = loading.load_module(EXPERIMENT)
  cfgs = [module.config(v) for v in loading.variants(module)]
  for cfg in cfgs:
    check_data(cfg)
  assert len({cfg.model.vocab_size for cfg in cfgs}) == 1


def test_tiny_pipeline(tmp_path):
  module = loading.load_module(EXPERIMENT)
  assert module.main(["--variant", "tiny", "--workdir", str(tmp_path), "--prompts", "2"]) == 0
  out = json.loads((tmp_path / "speculative-tiny" / "speculative.json").read_text())
  drafts = {r["draft"] for r in out["runs"]}
  assert drafts == {"draft_attention", "draft_mamba", "draft_mamba_kd_fkl", "draft_mamba_kd_tvd",
                    "draft_attention_kd_fkl", "draft_mamba_gkd_fkl", "self (ceiling)"}
  ceiling = next(r for r in out["runs"] if r["draft"] == "self (ceiling)")
  assert ceiling["greedy_acceptance"] == 1.0 and ceiling["t1_acceptance"] == 1.0
  assert all(1.0 <= r["greedy_tokens_per_pass"] <= r["k"] + 1 for r in out["runs"])
