"""Tests for typed dotted overrides (`--set key=value`) and for config validation messages."""

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memx.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from memx.errors import ConfigError, UserError
from memx.experiment.overrides import all_keys, apply_overrides, parse_assignments

KEYS = all_keys(Config())
INT_KEYS = ["model.d_model", "model.n_layers", "train.steps", "train.batch_size",
            "checkpoint.every"]
FLOAT_KEYS = ["optim.lr", "model.rope_theta", "optim.weight_decay", "data.eval_fraction"]
HYPOTHESIS = settings(max_examples=60, deadline=None)


def _error(overrides: dict, cfg=None) -> str:
  with pytest.raises(ConfigError) as e:
    apply_overrides(Config() if cfg is None else cfg, overrides)
  return str(e.value)


def _get(cfg, key: str):
  for part in key.split("."):
    cfg = getattr(cfg, part)
  return cfg


# ---------------------------------------------------------------------------------------------
# Typed parsing of every field kind


def _needs(key: str) -> dict:
  """Companion overrides a key is only valid with (windowed layers need a window)."""
  return {"model.attn_window": "8"} if key == "model.attn_window_layers" else {}


@pytest.mark.parametrize(("key", "text", "expected"), [
    # int
    ("model.d_model", "64", 64),
    ("train.steps", "1_000", 1000),
    ("train.seed", " 7 ", 7),
    # float (an integer literal becomes a float)
    ("optim.lr", "3e-4", 3e-4),
    ("optim.lr", "1", 1.0),
    ("model.rope_theta", "500000.0", 500000.0),
    # bool, in every spelling
    ("model.tie_embeddings", "false", False),
    ("model.tie_embeddings", "False", False),
    ("model.tie_embeddings", "0", False),
    ("model.tie_embeddings", "no", False),
    ("model.tie_embeddings", "off", False),
    ("checkpoint.enabled", "true", True),
    ("checkpoint.enabled", "YES", True),
    ("checkpoint.enabled", "1", True),
    ("checkpoint.enabled", "on", True),
    # str
    ("data.passkey_filler", "corpus", "corpus"),
    ("parallel.strategy", "dp", "dp"),
    # X | None
    ("model.n_kv_heads", "2", 2),
    ("model.n_kv_heads", "none", None),
    ("model.n_kv_heads", "None", None),
    ("optim.clip_norm", "0.5", 0.5),
    ("optim.clip_norm", "null", None),
    ("data.passkey_depth", "0.25", 0.25),
    ("model.attn_window", "64", 64),
    ("model.attn_impl", "xla", "xla"),
    ("model.attn_impl", "None", None),
    # Literal
    ("model.remat", "full", "full"),
    ("model.remat", "dots", "dots"),
    ("model.param_dtype", "bfloat16", "bfloat16"),
    # tuple[int, ...] (comma list, Python literal, empty), and tuple[int, ...] | None
    ("parallel.mesh_shape", "8", (8,)),
    ("parallel.mesh_shape", "-1", (-1,)),
    ("parallel.mesh_shape", "(4,)", (4,)),
    ("parallel.mesh_shape", "[2]", (2,)),
    ("model.attn_window_layers", "0,1", (0, 1)),
    ("model.attn_window_layers", "(1,)", (1,)),
    ("model.attn_window_layers", "none", None),
    ("model.attn_window_layers", "()", ()),
    # tuple[str, ...]
    ("data.paths", "a.txt", ("a.txt",)),
    ("data.paths", "a.txt, b.txt", ("a.txt", "b.txt")),
    ("data.paths", "['a b.txt', 'c,d.txt']", ("a b.txt", "c,d.txt")),
    ("data.paths", "()", ()),
    ("data.paths", "", ()),
    ("parallel.mesh_axes", "data", ("data",)),
    # str (a quoted literal spells what a shell argument cannot: newlines)
    ("data.text_separator", "<|endoftext|>", "<|endoftext|>"),
    ("data.text_separator", '"\\n\\n"', "\n\n"),
    ("data.text_separator", "' x '", " x "),
])
def test_string_values_are_parsed_by_field_type(key, text, expected):
  cfg = apply_overrides(Config(), {key: text, **_needs(key)})
  value = _get(cfg, key)
  assert value == expected
  assert type(value) is type(expected)
  if isinstance(value, tuple):
    assert all(type(v) is type(e) for v, e in zip(value, expected, strict=True))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("model.d_model", 64, 64),
    ("optim.lr", 1, 1.0),  # an int where a float is expected is widened
    ("model.tie_embeddings", False, False),
    ("optim.clip_norm", None, None),
    ("model.n_kv_heads", None, None),
    ("data.paths", ["a.txt", "b.txt"], ("a.txt", "b.txt")),  # JSON-style list
    ("model.attn_window_layers", [1], (1,)),
    ("model.remat", "full", "full"),
])
def test_python_values_from_sweep_entries_are_checked_and_converted(key, value, expected):
  value = _get(apply_overrides(Config(), {key: value, **_needs(key)}), key)
  assert value == expected and type(value) is type(expected)


def test_overrides_apply_in_order_to_nested_sections():
  cfg = apply_overrides(Config(), {"model.d_model": "64", "model.n_heads": "2",
                                   "data.paths": "x.txt", "data.source": "text",
                                   "train.steps": "5"})
  assert (cfg.model.d_model, cfg.model.n_heads) == (64, 2)
  assert (cfg.data.source, cfg.data.paths) == ("text", ("x.txt",))
  assert cfg.train.steps == 5
  assert cfg.optim == Config().optim  # untouched sections keep their values


def test_apply_overrides_returns_a_new_frozen_config_and_leaves_the_input_alone():
  original = Config()
  snapshot = dataclasses.asdict(original)
  new = apply_overrides(original, {"model.d_model": "64", "optim.lr": "1e-3"})
  assert new is not original and new.model is not original.model
  assert dataclasses.asdict(original) == snapshot
  assert original == Config()
  assert (new.model.d_model, new.optim.lr) == (64, 1e-3)
  assert new.train is original.train  # a section without overrides is shared, not copied
  with pytest.raises(dataclasses.FrozenInstanceError):
    new.model.d_model = 32  # type: ignore[misc]
  with pytest.raises(dataclasses.FrozenInstanceError):
    new.model = ModelConfig()  # type: ignore[misc]
  assert apply_overrides(original, {}) == original


def test_a_failed_override_leaves_the_input_alone():
  original = Config()
  _error({"model.d_model": "64", "train.steps": "many"}, original)
  assert original == Config()


def test_apply_overrides_works_on_a_single_section():
  assert apply_overrides(TrainConfig(), {"steps": "7"}) == TrainConfig(steps=7)


# ---------------------------------------------------------------------------------------------
# Unknown keys and wrong types


@pytest.mark.parametrize(("key", "hint"), [
    ("model.d_modle", "did you mean model.d_model"),
    ("trian.steps", "did you mean train.steps"),
    ("optim.learning_rate", "did you mean optim.lr?"),
    ("train.gradient_accumulation_steps", "did you mean train.microbatches?"),
    ("learning_rate", "did you mean optim.lr?"),
    ("optim.zzzzzzzzzzzzzzzzzz", "valid keys in 'optim': optim.lr, optim.min_lr_ratio"),
    ("zzz.qqq", "valid sections: checkpoint, data, finetune, local, model, optim, parallel, "
                "teacher, train"),
    ("model.d_model.x", "did you mean model.d_model"),
    ("model", "model.d_"),  # a section is not a leaf
])
def test_unknown_key_names_the_key_and_lists_valid_keys_near_it(key, hint):
  msg = _error({key: "1"})
  assert f"unknown config key {key!r}" in msg
  assert hint in msg


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("model.d_model", "abc", "expected int"),
    ("train.steps", "3.5", "expected int"),
    ("train.steps", "1e3", "expected int"),
    ("train.steps", True, "expected int"),  # bool is not an int here
    ("optim.lr", "fast", "expected float"),
    ("optim.lr", False, "expected float"),
    ("model.tie_embeddings", "maybe", "expected bool"),
    ("model.tie_embeddings", "2", "expected bool"),
    ("model.tie_embeddings", 1, "expected bool"),
    ("data.source", 3, "expected str"),
    ("model.n_kv_heads", "x", "expected int or None"),
    ("optim.clip_norm", "big", "expected float or None"),
    ("model.remat", "fast", "expected one of 'none', 'full', 'dots'"),
    ("model.compute_dtype", "float16", "expected one of 'float32', 'bfloat16'"),
    ("parallel.mesh_shape", "a,b", "expected a tuple of ints"),
    ("parallel.mesh_shape", "(1", "expected a tuple of ints"),
    ("parallel.mesh_shape", "[1, 'a']", "expected a tuple of ints"),
    ("parallel.mesh_shape", 8, "expected a tuple of ints"),
    ("model.attn_window_layers", "x", "expected a tuple of ints or None"),
    ("data.paths", 3, "expected a tuple of strs"),
    ("data.paths", "[1, 2]", "expected a tuple of strs"),
])
def test_wrong_type_says_what_was_expected(key, value, expected):
  msg = _error({key: value})
  assert msg.startswith(f"{key} = {value!r} has the wrong type")
  assert expected in msg


def test_errors_are_user_errors():
  with pytest.raises(ConfigError) as e:
    apply_overrides(Config(), {"nope": "1"})
  assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


@HYPOTHESIS
@given(key=st.text(min_size=1, max_size=30))
def test_any_unknown_key_is_a_config_error_naming_it(key):
  assume(key not in KEYS)
  with pytest.raises(ConfigError) as e:
    apply_overrides(Config(), {key: "1"})
  assert repr(key) in str(e.value)


@HYPOTHESIS
@given(parts=st.lists(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10),
                      min_size=1, max_size=3))
def test_any_unknown_dotted_key_gets_a_hint(parts):
  key = ".".join(parts)
  assume(key not in KEYS)
  with pytest.raises(ConfigError) as e:
    apply_overrides(Config(), {key: "1"})
  msg = str(e.value)
  assert repr(key) in msg
  assert "did you mean" in msg or "valid keys in" in msg or "valid sections" in msg


def _parses(text: str, tp) -> bool:
  try:
    tp(text.replace("_", "") if tp is int else text)
  except ValueError:
    return False
  return True


@HYPOTHESIS
@given(key=st.sampled_from(INT_KEYS), text=st.text(max_size=20))
def test_non_numeric_text_for_an_int_field_says_expected_int(key, text):
  assume(not _parses(text, int))
  msg = _error({key: text})
  assert key in msg and "expected int" in msg


@HYPOTHESIS
@given(key=st.sampled_from(FLOAT_KEYS), text=st.text(max_size=20))
def test_non_numeric_text_for_a_float_field_says_expected_float(key, text):
  assume(not _parses(text, float))
  msg = _error({key: text})
  assert key in msg and "expected float" in msg


@HYPOTHESIS
@given(key=st.sampled_from(["train.steps", "train.seed", "checkpoint.every", "model.n_layers"]),
       value=st.integers(min_value=1, max_value=10**9))
def test_integers_round_trip_through_text(key, value):
  assert _get(apply_overrides(Config(), {key: str(value)}), key) == value


@HYPOTHESIS
@given(value=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False))
def test_floats_round_trip_through_text(value):
  assert apply_overrides(Config(), {"optim.lr": repr(value)}).optim.lr == value


@HYPOTHESIS
@given(key=st.sampled_from(KEYS), text=st.text(max_size=30))
def test_any_text_for_any_key_parses_or_is_a_config_error(key, text):
  """No value, however malformed, escapes as anything but a ConfigError.

  A type error names the key; a validation error may name a related field instead (setting
  model.d_model can break model.n_heads), so it is only checked to be one.
  """
  try:
    apply_overrides(Config(), {key: text})
  except ConfigError as e:
    msg = str(e)
    if "has the wrong type" in msg:
      assert msg.startswith(f"{key} = {text!r}")
    else:
      assert " is not allowed: " in msg


# ---------------------------------------------------------------------------------------------
# parse_assignments (the --set KEY=VALUE list)


def test_parse_assignments_splits_on_the_first_equals_and_strips():
  assert parse_assignments([" model.d_model = 64 ", "data.paths=a=b.txt", "model.attn_impl="]) == {
      "model.d_model": "64", "data.paths": "a=b.txt", "model.attn_impl": ""}


@pytest.mark.parametrize("item", ["model.d_model", "=64", " =1", ""])
def test_parse_assignments_rejects_items_without_a_key(item):
  with pytest.raises(ConfigError, match="key=value"):
    parse_assignments([item])


# ---------------------------------------------------------------------------------------------
# Validation errors from __post_init__ name the field and the value


@pytest.mark.parametrize(("overrides", "fragments"), [
    ({"model.n_heads": "3"}, ["model.n_heads = 3", "must divide model.d_model = 128"]),
    ({"model.d_model": "90"}, ["model.n_heads = 4", "must divide model.d_model = 90"]),
    ({"model.n_heads": "128"}, ["model.n_heads = 128", "must be even for RoPE"]),
    ({"model.n_kv_heads": "3"}, ["model.n_kv_heads = 3", "divisor of model.n_heads = 4"]),
    ({"model.attn_sinks": "4"}, ["model.attn_sinks = 4", "model.attn_window"]),
    ({"model.attn_window_layers": "0,5", "model.attn_window": "8"},
     ["model.attn_window_layers = (0, 5)", "[0, 2)"]),
    ({"model.attn_window_layers": "0"}, ["model.attn_window_layers = (0,)", "attn_window"]),
    ({"parallel.mesh_shape": "-1,-1"}, ["parallel.mesh_shape = (-1, -1)", "mesh_axes"]),
    ({"parallel.mesh_shape": "0"}, ["parallel.mesh_shape = (0,)", "positive or -1"]),
    ({"parallel.mesh_axes": "model"}, ["parallel.mesh_axes = ('model',)", "'data' axis"]),
    ({"parallel.strategy": "zero9"}, ["parallel.strategy = 'zero9'", "expected one of"]),
    ({"data.task_fraction": "1.5"}, ["data.task_fraction = 1.5", "[0, 1]"]),
    ({"data.task_fraction": "0.5"}, ["data.task_fraction = 0.5", "needs data.task"]),
    ({"data.source": "text"}, ["data.paths = ()", "needs at least one file"]),
    ({"data.source": "wiki"}, ["data.source = 'wiki'", "expected one of"]),
    ({"data.seq_len": "4"}, ["data.seq_len = 4", "at least 8"]),
    ({"data.eval_fraction": "0.5"}, ["data.eval_fraction = 0.5", "(0, 0.5)"]),
    ({"data.vocab_size": "100"}, ["data.vocab_size = 100", ">= 261"]),
    ({"optim.lr": "0"}, ["optim.lr = 0.0", "finite and > 0"]),
    ({"optim.lr": "nan"}, ["optim.lr = nan", "must be finite and > 0"]),
    # Values that used to pass and turn into a NaN loss at step 1 (review, session 15).
    ({"optim.lr": "inf"}, ["optim.lr = inf", "finite"]),
    ({"optim.eps": "-1e-8"}, ["optim.eps = -1e-08", "finite and > 0"]),
    ({"model.init_std": "nan"}, ["model.init_std = nan", "finite and > 0"]),
    ({"model.norm_eps": "inf"}, ["model.norm_eps = inf", "finite and > 0"]),
    ({"model.ssm.dt_max": "inf"}, ["model.ssm.dt_max = inf", "finite"]),
    ({"model.rope_theta": "inf"}, ["model.rope_theta = inf", "finite"]),
    ({"model.attn_impl": "flash"}, ["model.attn_impl = 'flash'", "cudnn"]),
    # 2**32 would silently rerun seed 0 (32-bit keys).
    ({"train.seed": "4294967296"}, ["train.seed = 4294967296", "[0, 2**32)"]),
    ({"parallel.mesh_shape": "2,4", "parallel.mesh_axes": "data,tensor"},
     ["parallel.mesh_shape = (2, 4)", "splits nothing over mesh axes ('tensor',)"]),
    ({"optim.b1": "1.0"}, ["optim.b1 = 1.0", "[0, 1)"]),
    ({"optim.clip_norm": "0"}, ["optim.clip_norm = 0.0", "None (no clipping) or > 0"]),
    ({"train.steps": "0"}, ["train.steps = 0", "must be > 0"]),
    ({"train.batch_size": "-8"}, ["train.batch_size = -8", "must be > 0"]),
    ({"checkpoint.every": "0"}, ["checkpoint.every = 0", "positive step count"]),
    ({"checkpoint.keep": "0"}, ["checkpoint.keep = 0", ">= 1"]),
])
def test_validation_errors_name_the_field_and_value(overrides, fragments):
  msg = _error(overrides)
  for fragment in fragments:
    assert fragment in msg
  assert "is not allowed" in msg


@pytest.mark.parametrize(("make", "fragments"), [
    (lambda: ModelConfig(d_model=128, n_heads=3), ["model.n_heads = 3", "model.d_model = 128"]),
    (lambda: ModelConfig(remat="sometimes"), ["model.remat = 'sometimes'", "expected one of"]),
    (lambda: ParallelConfig(mesh_shape=(-1, -1), mesh_axes=("data", "model")),
     ["parallel.mesh_shape = (-1, -1)", "at most one axis may be -1"]),
    (lambda: DataConfig(task="mqar", task_fraction=1.5), ["data.task_fraction = 1.5", "[0, 1]"]),
    (lambda: DataConfig(source="corpus", task="mqar", task_fraction=-0.1),
     ["data.task_fraction = -0.1", "[0, 1]"]),
    (lambda: DataConfig(source="mqar", task="mqar"), ["data.task = 'mqar'", "LM source"]),
    (lambda: OptimConfig(warmup_steps=-1), ["optim.warmup_steps = -1", ">= 0"]),
])
def test_constructing_an_invalid_config_raises_config_error(make, fragments):
  with pytest.raises(ConfigError) as e:
    make()
  for fragment in fragments:
    assert fragment in str(e.value)


def test_nan_and_inf_are_rejected_where_a_range_is_required():
  for key in ("data.task_fraction", "data.eval_fraction", "optim.min_lr_ratio"):
    msg = _error({"data.task": "mqar", key: "nan"})
    assert key in msg and "nan" in msg


# ---------------------------------------------------------------------------------------------
# Regression: coupled fields change together, in any order.


@pytest.mark.parametrize("order", ["axes-first", "shape-first"])
def test_coupled_fields_can_change_together(order):
  pairs = [("parallel.mesh_axes", "data,model"), ("parallel.mesh_shape", "-1,1")]
  cfg = apply_overrides(Config(), dict(pairs if order == "axes-first" else pairs[::-1]))
  assert cfg.parallel.mesh_shape == (-1, 1)


def test_override_order_does_not_matter():
  cfg = apply_overrides(Config(), {"data.source": "text", "data.paths": "x.txt"})
  assert cfg.data.source == "text"


def test_a_config_file_with_unknown_keys_loads_with_a_warning(caplog):
  from memx.config import Config, from_dict, to_dict

  d = to_dict(Config())
  d["optim"]["learnig_rate"] = 1.0
  d["removed_section"] = {}
  with caplog.at_level("WARNING", logger="memx.config"):
    assert from_dict(d) == Config()
  text = caplog.text
  assert "optim.learnig_rate" in text and "removed_section" in text
