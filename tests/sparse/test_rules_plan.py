"""Rules (exact densities), plans (JSON, versions, fingerprints, baselines), applying a plan."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels.attention import Mask, elastic_mask
from memx.models.config import ModelConfig, hybrid_mixers
from memx.models.transformer import TransformerLM
from memx.sparse import plan as plans
from memx.sparse.plan import Plan, PlanError
from memx.sparse.rules import (
  Rule,
  candidate_rules,
  causal_pairs,
  density,
  kv_slots,
  mask_density,
  rules_mask,
  visited_pairs,
)

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("rule", [Rule(0, 0, 0), Rule(3, 0, 0), Rule(3, 0.1, 2), Rule(-5, 0.5, 4),
                                  Rule(10, 0.25, 50), Rule(0, 1, 0), Rule(200, 0, 3),
                                  Rule(2.5, 0, 1)])
def test_density_closed_form_is_exact(rule, n):
  # Oracle 1: element-wise count of the dense [N, N] mask.
  dense = np.asarray(rules_mask([rule], n).dense(n, n, head=0))
  assert visited_pairs(rule, n) == int(dense.sum())
  # Oracle 2: Mask's closed-form row counts.
  assert density(rule, n) == pytest.approx(mask_density(rules_mask([rule], n), n)[0], abs=0)
  # The span formula: α + β·N rounded half up, clipped to [1, N]; no sinks → the band only.
  span = min(n, max(1, int(np.floor(rule.alpha + rule.beta * n + 0.5))))
  assert rule.span(n) == span
  if rule.n_sink == 0:
    assert visited_pairs(rule, n) == sum(min(i, span) for i in range(1, n + 1))
  assert kv_slots(rule, n) == min(n, span + min(rule.n_sink, n))


def test_density_tracks_span_over_length():
  # Far from the causal start, a β·N span keeps ≈ 2β − β² of the causal pairs at every N.
  for n in (1024, 4096):
    assert density(Rule(0, 0.25, 0), n) == pytest.approx(2 * 0.25 - 0.25 ** 2, abs=2e-3)
  assert density(Rule.full(), 77) == 1.0
  assert causal_pairs(4) == 10


def test_rule_validation_and_candidates():
  with pytest.raises(ValueError, match="beta"):
    Rule(0, 1.5, 0)
  with pytest.raises(ValueError, match="n_sink"):
    Rule(0, 0.5, -1)
  cands = candidate_rules([128, 256], n_alphas=4, n_betas=4, n_sink=2)
  assert Rule.full() in cands and len(set(cands)) == len(cands)
  assert all(not all(r.is_dense(n) for n in (128, 256)) for r in cands if r != Rule.full())


def _heterogeneous(model_cfg=MODEL, kv_heads=None):
  rules = (Rule(4, 0.0, 2), Rule(0, 0.25, 1), Rule(8, 0.5, 0), Rule.full())
  layers = tuple(rules if model_cfg.mixer(i) == "attention" else None
                 for i in range(model_cfg.n_layers))
  return Plan(kind="moa", fingerprint=plans.model_fingerprint(model_cfg),
              n_layers=model_cfg.n_layers, n_heads=model_cfg.n_heads, lengths=(32, 64),
              layers=layers, budget=(0.9, 0.9), kv_heads=kv_heads)


def test_plan_json_round_trip_and_version(tmp_path):
  plan = _heterogeneous(kv_heads=2)
  path = plan.save(tmp_path / "plan.json")
  assert Plan.load(path) == plan
  d = json.loads(path.read_text())
  assert d["predicted_density"]["64"] == pytest.approx(plan.density(64))
  assert d["predicted_kv_fraction"]["64"] == pytest.approx(plan.kv_fraction(64))
  # A plan written before kv_heads was recorded still loads, without it.
  del d["kv_heads"], d["predicted_kv_fraction"]
  path.write_text(json.dumps(d))
  assert Plan.load(path) == dataclasses.replace(plan, kv_heads=None)
  for bad in (3, 0, 1.5, True):
    with pytest.raises(PlanError, match="kv_heads"):
      dataclasses.replace(plan, kv_heads=bad)
  d["version"] = 99
  path.write_text(json.dumps(d))
  with pytest.raises(PlanError, match="version 99"):
    Plan.load(path)
  with pytest.raises(PlanError, match="does not exist"):
    Plan.load(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(PlanError, match="not JSON"):
    Plan.load(tmp_path / "bad.json")


def test_plan_for_another_model_is_refused():
  plan = _heterogeneous()
  with pytest.raises(PlanError, match="3 layers × 4 heads"):
    plans.apply_plan(dataclasses.replace(MODEL, n_layers=3), plan)
  with pytest.raises(PlanError, match="fingerprint"):
    plans.apply_plan(dataclasses.replace(MODEL, d_model=64), plan)
  with pytest.raises(PlanError, match="per head"):
    Plan(kind="moa", fingerprint="x", n_layers=1, n_heads=4, lengths=(8,),
         layers=((Rule.full(),),))
  with pytest.raises(PlanError, match=r"\(0, 1\]"):
    plans.uniform_plan(MODEL, 1.5, [64])
  with pytest.raises(PlanError, match=r"\(0, 1\]"):
    plans.uniform_plan(MODEL, 0.0, [64])


def test_fingerprint_ignores_plan_and_impl():
  applied = plans.apply_plan(MODEL, _heterogeneous())
  assert applied.attn_plan is not None
  assert plans.model_fingerprint(applied) == plans.model_fingerprint(MODEL)
  assert plans.model_fingerprint(dataclasses.replace(MODEL, attn_impl="xla")) == \
      plans.model_fingerprint(MODEL)


def test_model_config_validates_plan():
  with pytest.raises(Exception, match="one entry per layer"):
    dataclasses.replace(MODEL, attn_plan=((None),))
  with pytest.raises(Exception, match=r"attn_plan\[0\]\[1\]"):
    dataclasses.replace(MODEL, attn_plan=(((0, 0.5, 0), (0, 2.0, 0), (0, 0, 0), (0, 0, 0)), None))
  hybrid = dataclasses.replace(MODEL, mixers=hybrid_mixers(2, 2))
  with pytest.raises(Exception, match="mamba2 layer"):
    dataclasses.replace(hybrid, attn_plan=(None, ((0, 1, 0),) * 4))
  with pytest.raises(Exception, match="attn_window"):
    dataclasses.replace(MODEL, attn_window=8, attn_plan=(None, None))


def test_baselines_meet_the_budget():
  lengths = (128, 256, 512)
  u = plans.uniform_plan(MODEL, 0.3, lengths, n_sink=4)
  assert all(u.density(n) <= 0.3 for n in lengths)
  assert max(u.density(n) for n in lengths) > 0.28  # the widest window that fits
  four = dataclasses.replace(MODEL, n_layers=6)
  lg = plans.longgen_plan(four, 0.5, lengths, n_sink=4)
  assert lg.meta["dense_layers"] == [1, 4]
  assert all(lg.density(n) <= 0.5 for n in lengths)
  with pytest.raises(PlanError, match="LongGen"):
    plans.longgen_plan(four, 0.25, lengths)
  with pytest.raises(PlanError, match="infeasible"):
    plans.uniform_plan(MODEL, 0.01, [16], n_sink=4)
  # The message names the length that breaks its budget (the other one fits).
  with pytest.raises(PlanError, match="budget 0.1 at length 64 .* needs 0.149"):
    plans.uniform_plan(MODEL, [0.5, 0.1], [32, 64], n_sink=4)


def test_per_length_budgets_follow_their_lengths():
  """Budgets given for lengths listed in any order stay with their own length."""
  for make in (plans.uniform_plan, plans.longgen_plan):
    model = dataclasses.replace(MODEL, n_layers=3)
    down = make(model, [0.6, 0.4], (512, 128), n_sink=4)
    up = make(model, [0.4, 0.6], (128, 512), n_sink=4)
    assert down == up and down.lengths == (128, 512) and down.budget == (0.4, 0.6)
    assert down.density(128) <= 0.4 and down.density(512) <= 0.6


def test_full_span_plan_reproduces_dense_outputs():
  model = TransformerLM(MODEL, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, MODEL.vocab_size)
  dense = model(tokens)
  plan = plans.dense_plan(MODEL, [48])
  from memx.sparse.evaluate import with_plan
  planned = with_plan(model, plan)
  assert planned.cfg.attn_plan is not None
  np.testing.assert_allclose(planned(tokens), dense, atol=1e-5, rtol=1e-5)
  # A sparse plan changes them, and equals the reference with the same per-head masks.
  sparse = with_plan(model, _heterogeneous())
  assert not np.allclose(sparse(tokens), dense, atol=1e-3)


def test_applied_plan_masks_follow_length():
  cfg = plans.apply_plan(MODEL, _heterogeneous())
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  attn = model.blocks[0].attn
  for n in (16, 64):
    m = attn.mask(n)
    assert m == elastic_mask(cfg.attn_plan[0], n)
    assert isinstance(m, Mask) and m.window_left[1] == max(1, round(0.25 * n)) - 1
  # The parallel forward runs at every length (static per trace).
  for n in (16, 40):
    assert model(jnp.zeros((1, n), jnp.int32)).shape == (1, n, MODEL.vocab_size)


def test_effective_context_is_longest_length_above_threshold():
  from memx.sparse.evaluate import effective_context
  assert effective_context([128, 256, 512], [0.0, 1.0, 0.0]) == 256
  assert effective_context([128, 256], [0.95, 0.89]) == 128
  assert effective_context([128], [None]) is None


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_plan_kv_fraction_is_the_decode_caches(kv_heads):
  """Oracle: the bytes of the KV arrays `TransformerLM.init_cache` allocates (per-KV-head rings
  sized by their widest query head) over a dense cache's, for a heterogeneous plan and the
  baselines, on a hybrid model whose SSM layer has no KV cache."""
  from memx.nn.attention_decode import kv_cache_bytes

  cfg = dataclasses.replace(MODEL, n_layers=3, n_kv_heads=kv_heads,
                            mixers=("attention", "mamba2", "attention"))
  for plan in (_heterogeneous(cfg, kv_heads), plans.uniform_plan(cfg, 0.3, (64, 96)),
               plans.longgen_plan(dataclasses.replace(cfg, n_layers=4, mixers=None), 0.5,
                                  (64, 96))):
    model_cfg = cfg if plan.n_layers == 3 else dataclasses.replace(cfg, n_layers=4, mixers=None)
    assert plan.kv_heads == kv_heads
    applied = plans.apply_plan(model_cfg, plan)
    model = TransformerLM(applied, rngs=nnx.Rngs(0))
    for n in plan.lengths:
      cache = model.init_cache(1, n)
      kv = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(cache)
               if jax.tree_util.keystr(path).endswith((".k", ".v", "'k']", "'v']")))
      assert kv == kv_cache_bytes(applied, n)
      assert plan.kv_fraction(n) == pytest.approx(kv / kv_cache_bytes(applied, n, full=True),
                                                  rel=1e-12)
  # Without kv_heads (an older plan): the per-query-head fraction, lower under GQA.
  old = dataclasses.replace(_heterogeneous(cfg, kv_heads), kv_heads=None)
  assert old.kv_fraction(64) == pytest.approx(old.kv_slots(64) / (64 * 4 * 2))
  assert old.kv_fraction(64) <= _heterogeneous(cfg, kv_heads).kv_fraction(64)


def test_baselines_refuse_a_model_without_attention_and_plans_check_lengths(tmp_path):
  # A uniform/LongGen plan for a pure Mamba-2 model used to be written with its budget ignored.
  mamba = dataclasses.replace(MODEL, mixers=("mamba2",) * MODEL.n_layers)
  for make in (plans.uniform_plan, plans.longgen_plan):
    with pytest.raises(PlanError, match="no attention layer"):
      make(mamba, 0.5, (64,))
  with pytest.raises(PlanError, match="must be positive token counts"):
    dataclasses.replace(plans.dense_plan(MODEL, (64,)), lengths=(-64,))
  with pytest.raises(PlanError, match="is a directory"):
    Plan.load(tmp_path)
