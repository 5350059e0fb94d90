"""MoA's validation: Pareto plans over the per-length objectives, measured loss, the least kept."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from memx.data import make_loader
from memx.errors import UserError
from memx.sparse import plan as plans
from memx.sparse import search
from memx.sparse.evaluate import with_plan
from memx.sparse.profile import ProfileError, calibration_data, profile_model
from memx.sparse.rules import Rule, candidate_rules, density
from memx.sparse.validate import (
  CUT,
  VALIDATION_SEED,
  choose,
  guard_source,
  measured_head_scale,
  pareto_plans,
  simplex_weights,
  validate,
  validation_losses,
)
from memx.train.loss import token_losses
from memx.train.restore import load_trained

LENGTHS = (32, 64)


@pytest.fixture(scope="module")
def trained(tiny_run):
  return load_trained(tiny_run)


@pytest.fixture(scope="module")
def profile(trained):
  return profile_model(trained.model, calibration_data(trained.cfg.data), LENGTHS, batches=1,
                       batch_size=4, block=16)


def test_simplex_weights_cover_the_lattice_once():
  assert simplex_weights(2, 3) == [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0)]
  w = simplex_weights(3, 3)
  assert len(w) == 7 and w[0] == pytest.approx((1 / 3,) * 3)  # 6 lattice points + the centre
  assert all(abs(sum(x) - 1) < 1e-12 and min(x) >= 0 for x in w)
  assert len(set(w)) == len(w)
  assert simplex_weights(1, 5) == [(1.0,)]
  with pytest.raises(UserError, match=">= 1"):
    simplex_weights(2, 0)


def _assert_optimal(profile, plan, rules, cost, budget):
  """The plan's cost equals the optimum `search.solve_milp` proves for `cost` (the oracle: the
  program assembled here, independently of `search_plan`)."""
  dens = np.array([[density(r, n) for n in LENGTHS] for r in rules])
  dens = np.broadcast_to(dens[None], (cost.shape[0], *dens.shape))
  layer_of = np.repeat(np.arange(len(profile.layers)), profile.n_heads)
  sol = search.solve_milp(cost, dens, [budget] * len(LENGTHS), layer_of=layer_of,
                          mip_rel_gap=0.0)
  chosen = np.array([rules.index(r) for r in plan.rules()])
  assert cost[np.arange(len(chosen)), chosen].sum() == pytest.approx(sol.objective, abs=1e-9)


def test_length_weights_solve_the_weighted_program(profile):
  """A weighting (1, 0) is the program with the first length's cost alone, both budgets kept:
  the same optimum as `search.solve_milp` on that cost (independent assembly)."""
  rules = candidate_rules(LENGTHS, n_sink=2)
  plan = plans.search_plan(profile, 0.4, n_sink=2, length_weights=(1.0, 0.0),
                           method="milp")
  _assert_optimal(profile, plan, rules, profile.costs(rules, (32,)), 0.4)
  # predicted_loss stays the unweighted sum over lengths, comparable across plans.
  assert plan.predicted_loss == pytest.approx(plans.predicted_loss(profile, plan), rel=1e-9)
  assert plan.meta["length_weights"] == [1.0, 0.0]
  with pytest.raises(plans.PlanError, match="length_weights"):
    plans.search_plan(profile, 0.4, length_weights=(0.0, 0.0))
  with pytest.raises(plans.PlanError, match="length_weights"):
    plans.search_plan(profile, 0.4, length_weights=(1.0,))


def test_search_keeps_per_length_values_with_their_lengths(profile):
  down = plans.search_plan(profile, [0.6, 0.3], lengths=(64, 32), n_sink=2,
                           length_weights=(0.0, 1.0))
  up = plans.search_plan(profile, [0.3, 0.6], lengths=(32, 64), n_sink=2,
                         length_weights=(1.0, 0.0))
  assert down.attn_plan() == up.attn_plan() and down.budget == up.budget == (0.3, 0.6)
  assert down.density(32) <= 0.3 and down.density(64) <= 0.6


def test_pareto_plans_are_distinct_and_within_budget(profile):
  front = pareto_plans(profile, 0.4, points=5, n_sink=2)
  assert front[0].attn_plan() == plans.search_plan(profile, 0.4, n_sink=2).attn_plan()
  assert len({p.attn_plan() for p in front}) == len(front) >= 1
  for p in front:
    assert all(p.density(n) <= 0.4 + 1e-9 for n in LENGTHS)
  # Each extreme weighting's plan is optimal for its own length's predicted loss.
  by_w = {tuple(p.meta["length_weights"]): p for p in front}
  for w, p in by_w.items():
    if w in ((1.0, 0.0), (0.0, 1.0)):
      n = LENGTHS[w.index(1.0)]
      for q in front:
        assert plans.predicted_loss(profile, p, [n]) <= plans.predicted_loss(
            profile, q, [n]) + 1e-9


def _measured(model, plan, data_cfg, n, batches, batch_size):
  """The oracle: weighted mean token loss over the same rows, straight from the model."""
  loader = make_loader(dataclasses.replace(data_cfg, seq_len=n), batch_size=batch_size,
                       seed=VALIDATION_SEED, split="train")
  total = weight = 0.0
  m = with_plan(model, plan)
  for k in range(batches):
    b = loader.local_batch(k)
    losses = np.asarray(token_losses(m(jnp.asarray(b["inputs"])), b["targets"]))
    total += float((losses * b["weights"]).sum())
    weight += float(b["weights"].sum())
  return total / weight


def test_validation_picks_the_least_measured_loss(trained, profile):
  data = calibration_data(trained.cfg.data)
  plan, records = validate(trained.model, profile, 0.3, data, 128, points=5, batches=2,
                           batch_size=4, n_sink=2)
  losses = [r["loss"] for r in records]
  assert len(records) >= 2  # the front has more than the plain search's plan
  v = plan.meta["validation"]
  assert v["length"] == 128 and v["calibration"] == "mqar" and len(v["candidates"]) == len(records)
  assert losses[v["chosen"]] == min(losses)
  assert plan.attn_plan() == pareto_plans(profile, 0.3, points=5, n_sink=2)[v["chosen"]].attn_plan()
  # Measured losses are the model's: checked against a direct forward (dense and one plan).
  dense, first = validation_losses(trained.model, [None, plan], data, 128, batches=2,
                                   batch_size=4)
  np.testing.assert_allclose(dense["loss"], _measured(trained.model, None, data, 128, 2, 4),
                             rtol=1e-5)
  np.testing.assert_allclose(first["loss"], _measured(trained.model, plan, data, 128, 2, 4),
                             rtol=1e-5)
  assert first["loss"] == pytest.approx(losses[v["chosen"]], rel=1e-6)
  assert 0.0 <= first["exact_match"] <= 1.0
  # A plan whose spans cover every length reproduces the dense model.
  full = plans.dense_plan(trained.cfg.model, LENGTHS)
  (same,) = validation_losses(trained.model, [full], data, 128, batches=2, batch_size=4)
  assert same["loss"] == pytest.approx(dense["loss"], rel=1e-5)


def test_choose_keeps_the_least_loss_within_the_guard():
  records = [{"loss": 0.1, "guard_loss": 2.5}, {"loss": 0.3, "guard_loss": 2.05},
             {"loss": 0.2, "guard_loss": 2.09}, {"loss": 0.5, "guard_loss": 2.01}]
  assert choose(records) == (0, True)                     # no guard: the least loss
  assert choose(records, 0.1, 2.0) == (2, True)           # 0 is out; 2 beats 1 and 3
  assert choose(records, 0.06, 2.0) == (1, True)
  assert choose(records, 1.0, 2.0) == (0, True)
  assert choose(records, 0.0, 2.0) == (3, False)          # none within: the least guard loss


def test_validation_guard_measures_the_lm_loss(trained, profile):
  data = calibration_data(trained.cfg.data)
  guard = guard_source(trained.cfg.data)
  assert guard.source == "corpus" and guard.task is None and guard.task_fraction == 0.0
  # Task-shaping fields go with the task (the MoA experiment's runs set passkey_min_len).
  shaped = dataclasses.replace(trained.cfg.data, task="passkey",
                               passkey_min_len=trained.cfg.data.seq_len)
  assert guard_source(shaped).passkey_min_len is None
  plan, records = validate(trained.model, profile, 0.3, data, 128, points=5, batches=2,
                           batch_size=4, n_sink=2, guard_data=guard, guard_tolerance=0.02)
  g = plan.meta["validation"]["guard"]
  assert g["source"] == "corpus" and g["tolerance"] == 0.02
  # The guard losses are the model's, on corpus rows: checked against a direct forward.
  assert g["dense_loss"] == pytest.approx(_measured(trained.model, None, guard, 128, 2, 4),
                                          rel=1e-5)
  chosen = plan.meta["validation"]["chosen"]
  assert records[chosen]["guard_loss"] == pytest.approx(
      _measured(trained.model, plan, guard, 128, 2, 4), rel=1e-5)
  assert (chosen, g["met"]) == choose(records, 0.02, g["dense_loss"])
  if g["met"]:
    assert records[chosen]["guard_loss"] <= g["dense_loss"] + 0.02
  # The calibration losses do not depend on the guard.
  _, plain = validate(trained.model, profile, 0.3, data, 128, points=5, batches=2,
                      batch_size=4, n_sink=2)
  assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_validation_rejects_bad_input_before_compute(trained, profile):
  data = calibration_data(trained.cfg.data)
  other = dataclasses.replace(trained.cfg.model, n_heads=2, n_kv_heads=1)
  foreign = plans.dense_plan(other, LENGTHS)
  with pytest.raises(plans.PlanError):
    validation_losses(trained.model, [foreign], data, 64)
  with pytest.raises(UserError, match="batches"):
    validation_losses(trained.model, [None], data, 64, batches=0)
  with pytest.raises(UserError, match="batches"):  # before any search is run
    validate(trained.model, profile, 0.4, data, 64, batches=0)
  corpus = guard_source(trained.cfg.data)
  with pytest.raises(UserError, match="both guard_data and guard_tolerance"):
    validate(trained.model, profile, 0.4, data, 64, guard_data=corpus)
  for bad in (-0.1, float("nan")):
    with pytest.raises(UserError, match="guard_tolerance"):
      validate(trained.model, profile, 0.4, data, 64, guard_data=corpus, guard_tolerance=bad)
  with pytest.raises(UserError, match="language-modelling source"):
    guard_source(data)  # the task alone has no LM rows


def test_head_scale_multiplies_each_heads_costs(profile):
  rules = candidate_rules(LENGTHS, n_sink=2)
  scale = np.ones(len(profile.layers) * profile.n_heads)
  scale[1] = 1e3  # head 0.1: cutting it now costs a thousandfold
  plan = plans.search_plan(profile, 0.4, n_sink=2, head_scale=scale, method="milp")
  _assert_optimal(profile, plan, rules, profile.costs(rules, LENGTHS) * scale[:, None], 0.4)
  assert plan.predicted_loss == pytest.approx(plans.predicted_loss(profile, plan), rel=1e-9)
  assert plan.meta["head_scale"][1] == 1e3
  for bad in (np.ones(3), np.full(len(scale), 0.5), np.full(len(scale), np.nan)):
    with pytest.raises(plans.PlanError, match="head_scale"):
      plans.search_plan(profile, 0.4, head_scale=bad)


def test_measured_head_scale_matches_the_plan_path(trained, profile):
  """The bias-based measurement against an independent one: the model run under a plan whose
  only cut is that head (the elastic-mask attention path), loss differences from dense."""
  data = calibration_data(trained.cfg.data)
  scale = measured_head_scale(trained.model, profile, data, 64, batches=2, batch_size=4)
  assert scale.shape == (len(profile.layers) * profile.n_heads,) and (scale >= 1).all()
  removed = profile.removed_fraction([CUT], 64)[0]
  dense = _measured(trained.model, None, data, 64, 2, 4)
  for li, layer in enumerate(profile.layers):
    for h in range(profile.n_heads):
      rules = [[Rule.full()] * profile.n_heads for _ in range(trained.cfg.model.n_layers)]
      rules[layer][h] = CUT
      cut = dataclasses.replace(plans.dense_plan(trained.cfg.model, LENGTHS),
                                layers=tuple(tuple(r) for r in rules))
      measured = _measured(trained.model, cut, data, 64, 2, 4) - dense
      predicted = float((profile.influence[64][li, h] * removed).sum())
      want = max(1.0, measured / predicted)
      assert scale[li * profile.n_heads + h] == pytest.approx(want, rel=2e-3, abs=2e-3)
  with pytest.raises(ProfileError, match="no data"):
    measured_head_scale(trained.model, profile, data, 128)


def test_validating_below_the_longest_profiled_length_warns(trained, profile, caplog):
  data = calibration_data(trained.cfg.data)
  with caplog.at_level("WARNING", logger="memx.sparse.validate"):
    validate(trained.model, profile, 0.4, data, 48, points=1, batches=1, batch_size=2,
             n_sink=2)
  assert "below the longest profiled length 64" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="memx.sparse.validate"):
    validate(trained.model, profile, 0.4, data, 64, points=1, batches=1, batch_size=2,
             n_sink=2)
  assert "below the longest" not in caplog.text


def test_validate_adds_the_corrected_plans(trained, profile):
  data = calibration_data(trained.cfg.data)
  raw = plans.search_plan(profile, 0.3, n_sink=2).rules()
  scale = np.ones(len(raw))
  scale[int(np.argmin([r.span(64) for r in raw]))] = 1e3  # the head the plain search cuts most
  plan, records = validate(trained.model, profile, 0.3, data, 64, points=3, batches=1,
                           batch_size=4, n_sink=2, head_scale=scale)
  assert any(r["corrected"] for r in records) and not records[0]["corrected"]
  losses = [r["loss"] for r in records]
  assert losses[plan.meta["validation"]["chosen"]] == min(losses)
