"""describe_differences: stored configs from before a field existed still match at its default."""

from memx._validate import describe_differences
from memx.config import Config, to_dict


def _stored_without(key: str) -> dict:
  d = to_dict(Config())
  del d["data"][key]
  return d


def test_a_field_added_since_matches_at_its_default():
  old = _stored_without("document_mask")  # a run written before data.document_mask existed
  now = to_dict(Config())
  assert describe_differences(old, now) == ""
  now["data"]["document_mask"] = True
  assert describe_differences(old, now) == "data.document_mask = absent there, True now"
  # Identities nest the same paths; a None field added since matches as before.
  assert describe_differences({"data": old["data"]}, {"data": to_dict(Config())["data"]}) == ""
  assert describe_differences(_stored_without("eos_id"), to_dict(Config())) == ""
  # Keys that are no config field's match only at None.
  assert describe_differences({}, {"data": {"new_field": 3}}) == (
      "data.new_field = absent there, 3 now")
  assert describe_differences({}, {"data": {"new_field": None}}) == ""


def test_a_section_added_since_matches_a_stored_config_without_it():
  """A config.json written before the finetune section existed (as JSON: tuples are lists)
  matches today's config at the section's defaults."""
  import json


  stored = json.loads(json.dumps(to_dict(Config())))
  del stored["finetune"]
  now = json.loads(json.dumps(to_dict(Config())))
  assert describe_differences(stored, now) == ""
  now["finetune"]["lora_rank"] = 4
  assert describe_differences(stored, now) == "finetune.lora_rank = absent there, 4 now"


def test_fields_added_later_leave_the_hash_alone_at_their_old_behaviour():
  """HASH_NEUTRAL fields at their neutral value are not hashed (adding them renamed no run);
  any other value is."""
  import dataclasses
  import hashlib
  import json

  from memx.config import (
    HASH_NEUTRAL,
    Config,
    FinetuneConfig,
    OptimConfig,
    TrainConfig,
    config_hash,
    to_dict,
  )

  cfg = Config()
  d = to_dict(cfg)
  for section, name in HASH_NEUTRAL:
    del d[section][name]
  d = {k: v for k, v in d.items() if v != {}}  # sections added since are absent
  assert "finetune" not in d
  before = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
  assert config_hash(cfg) == before
  for changed in (dataclasses.replace(cfg, train=TrainConfig(batch_size=16, microbatches=2)),
                  dataclasses.replace(cfg, optim=OptimConfig(name="lion")),
                  dataclasses.replace(cfg, optim=OptimConfig(mu_dtype="bfloat16")),
                  dataclasses.replace(cfg, finetune=FinetuneConfig(lora_rank=8))):
    assert config_hash(changed) != before
