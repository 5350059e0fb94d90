"""MoA plan search: the MILP is exact (brute force), greedy is feasible, bad inputs are named."""

import itertools

import numpy as np
import pytest
import scipy.optimize

from memx.errors import UserError
from memx.sparse import search
from memx.sparse.search import (
    InfeasibleBudgetError,
    NoPlanFoundError,
    SearchInputError,
    lp_bound,
    solve,
    solve_greedy,
    solve_milp,
)


def _instance(rng, n_heads, n_rules, n_lengths, *, nested=False, slack=(0.1, 0.9)):
  """Random costs and densities; each length's budget lies between the sparsest and densest plan."""
  if nested:  # denser rules cost less, as with real MoA candidates
    density = np.sort(rng.uniform(0.02, 1.0, (n_heads, n_rules, n_lengths)), axis=1)
    cost = np.sort(rng.uniform(0.0, 1.0, (n_heads, n_rules)), axis=1)[:, ::-1].copy()
  else:
    density = rng.uniform(0.05, 1.0, (n_heads, n_rules, n_lengths))
    cost = rng.normal(size=(n_heads, n_rules))  # negative costs are allowed too
  lo, hi = density.min(axis=1).mean(axis=0), density.max(axis=1).mean(axis=0)
  budget = np.minimum(lo + rng.uniform(*slack, size=n_lengths) * (hi - lo), 1.0)
  return cost, density, budget


def _layer_avgs(d, layer_of):
  return {int(lay): d[layer_of == lay].mean(axis=0) for lay in np.unique(layer_of)}


def _brute_force(cost, density, budget, layer_of=None, layer_budget=None, allowed=None):
  """Least objective over every choice of one rule per head, or None if no choice fits."""
  n_heads, n_rules, _ = density.shape
  heads = np.arange(n_heads)
  best = None
  for choice in itertools.product(range(n_rules), repeat=n_heads):
    choice = np.array(choice)
    if allowed is not None and not allowed[heads, choice].all():
      continue
    d = density[heads, choice]
    if (d.mean(axis=0) > budget * (1 + 1e-9)).any():
      continue
    if layer_budget is not None and any(
        (avg > layer_budget * (1 + 1e-9)).any() for avg in _layer_avgs(d, layer_of).values()):
      continue
    obj = cost[heads, choice].sum()
    best = obj if best is None else min(best, obj)
  return best


def _assert_feasible(sol, cost, density, budget, layer_of=None, layer_budget=None, allowed=None):
  n_heads = cost.shape[0]
  heads = np.arange(n_heads)
  assert sol.choice.shape == (n_heads,) and sol.choice.dtype.kind == "i"
  d = density[heads, sol.choice]
  np.testing.assert_allclose(sol.densities, d.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sol.objective, cost[heads, sol.choice].sum(), rtol=1e-12)
  assert (sol.densities <= np.asarray(budget) * (1 + 1e-9)).all(), (sol.densities, budget)
  if layer_budget is not None:
    for avg in _layer_avgs(d, layer_of).values():
      assert (avg <= layer_budget * (1 + 1e-9)).all()
  if allowed is not None:
    assert allowed[heads, sol.choice].all()
  assert sol.gap >= 0 and sol.bound <= sol.objective + 1e-9 * max(1.0, abs(sol.objective))


@pytest.mark.parametrize("layered", [False, True])
def test_milp_matches_brute_force(layered):
  rng = np.random.default_rng(1 + layered)
  layer_of = np.array([0, 0, 1, 1])
  n_feasible = 0
  for _ in range(30):
    cost, density, budget = _instance(rng, 4, 3, 2)
    allowed = rng.uniform(size=(4, 3)) > 0.2
    allowed[np.arange(4), rng.integers(0, 3, 4)] = True
    kw = dict(allowed=allowed)
    if layered:
      kw.update(layer_of=layer_of, layer_budget=float(min(1.0, budget.max() + 0.05)))
    best = _brute_force(cost, density, budget, **kw)
    if best is None:
      with pytest.raises(InfeasibleBudgetError):
        solve_milp(cost, density, budget, mip_rel_gap=0.0, **kw)
      with pytest.raises((InfeasibleBudgetError, NoPlanFoundError)):
        solve_greedy(cost, density, budget, **kw)
      continue
    n_feasible += 1
    sol = solve_milp(cost, density, budget, mip_rel_gap=0.0, **kw)
    _assert_feasible(sol, cost, density, budget, **kw)
    assert sol.method == "milp" and sol.status == "optimal" and sol.gap == 0
    np.testing.assert_allclose(sol.objective, best, rtol=1e-9, atol=1e-9)
    assert sol.bound == sol.objective
    greedy = solve_greedy(cost, density, budget, **kw)
    _assert_feasible(greedy, cost, density, budget, **kw)
    assert greedy.objective >= best - 1e-9
    assert lp_bound(cost, density, budget, **kw) <= best + 1e-9
  assert n_feasible >= 12  # the instances mostly have plans: the comparison is not vacuous


@pytest.mark.parametrize("layered", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_milp_no_worse_than_greedy(layered, nested):
  rng = np.random.default_rng(10 + 2 * layered + nested)
  layer_of = np.repeat(np.arange(5), 4)
  for _ in range(3):
    cost, density, budget = _instance(rng, 20, 8, 3, nested=nested, slack=(0.2, 0.6))
    kw = dict(layer_of=layer_of, layer_budget=float(min(1.0, budget.max() + 0.1)) if layered
              else None)
    milp = solve(cost, density, budget, method="milp", **kw)
    greedy = solve(cost, density, budget, method="greedy", **kw)
    bound = lp_bound(cost, density, budget, **kw)
    assert (milp.method, greedy.method) == ("milp", "greedy")
    for sol in (milp, greedy):
      _assert_feasible(sol, cost, density, budget, **kw)
    assert milp.objective <= greedy.objective + 1e-9
    assert bound <= milp.objective + 1e-9
    np.testing.assert_allclose(greedy.bound, bound, rtol=1e-12)
    assert greedy.gap >= 0 and "greedy" in greedy.status
    assert milp.gap <= 1e-4 + 1e-12  # the default mip_rel_gap


def _eager_greedy_upgrades(cost, density, budget, choice):
  """Reference: rescore every head × rule each step (global budget only)."""
  heads = np.arange(cost.shape[0])
  caps = budget * cost.shape[0]
  while True:
    cur = density[heads, choice]
    usage = cur.sum(axis=0)
    slack = caps - usage
    delta = density - cur[:, None, :]
    gain = cost[heads, choice][:, None] - cost
    fits = (gain > 0) & (delta <= slack + caps * 1e-9).all(axis=2)
    use = (np.maximum(delta, 0) / np.maximum(slack, caps * 1e-12)).max(axis=2)
    if not fits.any():
      return choice
    free = fits & (use <= 0)
    ratio = (np.where(free, gain, -np.inf) if free.any()
             else np.where(fits, gain / np.where(fits & (use > 0), use, 1.0), -np.inf))
    i, r = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    choice[i] = r


def test_lazy_greedy_equals_eager_reference():
  rng = np.random.default_rng(3)
  for _ in range(3):
    cost, density, budget = _instance(rng, 40, 12, 3, nested=True, slack=(0.2, 0.6))
    sol = solve_greedy(cost, density, budget)
    start = np.argmin((density / budget).max(axis=2), axis=1)
    np.testing.assert_array_equal(sol.choice, _eager_greedy_upgrades(cost, density, budget, start))


def test_infeasible_budget_names_the_length_before_solving(monkeypatch):
  def no_solve(*args, **kwargs):
    raise AssertionError("solved before checking the budget")

  monkeypatch.setattr(scipy.optimize, "milp", no_solve)
  monkeypatch.setattr(scipy.optimize, "linprog", no_solve)
  density = np.full((4, 2, 2), 0.5)
  density[:, 0, 1] = 0.25  # rule 0 is the sparsest: 0.5 at the first length, 0.25 at the second
  cost = np.zeros((4, 2))
  for fn in (solve, solve_milp, solve_greedy, lp_bound):
    with pytest.raises(InfeasibleBudgetError, match=r"at length 1024 is infeasible.*average 0\.5 "):
      fn(cost, density, [0.3, 0.3], lengths=(1024, 4096))
  with pytest.raises(InfeasibleBudgetError, match=r"at length #1 is infeasible.*average 0\.25 "):
    solve(cost, density, [0.6, 0.2])

  # A layer budget: layer 7's heads are dense, the others sparse, the average fits overall.
  density = np.full((4, 2, 1), 0.1)
  density[2:] = 0.6
  with pytest.raises(InfeasibleBudgetError, match=r"layer budget for layer 7 .*at length 512"):
    solve(cost, density, 0.5, layer_of=[3, 3, 7, 7], layer_budget=0.5, lengths=[512])
  assert issubclass(InfeasibleBudgetError, UserError)


def test_joint_infeasibility():
  # Each rule is sparse at one length and dense at the other: every length alone fits.
  density = np.array([[[0.1, 0.9], [0.9, 0.1]]])
  cost = np.zeros((1, 2))
  # A half-half LP mix meets 0.5 at both lengths, no integer choice does.
  with pytest.raises(InfeasibleBudgetError, match="at once"):
    solve_milp(cost, density, 0.5)
  with pytest.raises(NoPlanFoundError, match="method='milp'"):
    solve_greedy(cost, density, 0.5)
  # At 0.4 even the LP relaxation has no solution: greedy reports it as proven.
  with pytest.raises(InfeasibleBudgetError, match="LP relaxation is infeasible"):
    solve_greedy(cost, density, 0.4)


def test_greedy_repairs_a_start_that_breaks_budgets_jointly():
  density = np.array([[[0.1, 0.9], [0.9, 0.1]]] * 2)
  cost = np.array([[1.0, 1.0], [1.0, 1.0]])
  # Both heads start on rule 0 (a tie; 0.2 and 1.8 summed), too dense at the second length.
  sol = solve_greedy(cost, density, 0.5)
  _assert_feasible(sol, cost, density, 0.5)
  assert sorted(sol.choice.tolist()) == [0, 1]


def test_budget_met_exactly_survives_float_sums():
  density = np.full((3, 2, 1), 0.1)
  density[:, 1] = 1.0
  cost = np.array([[1.0, 0.0]] * 3)
  for method in ("milp", "greedy"):  # 0.1 + 0.1 + 0.1 > 0.3 in floats
    sol = solve(cost, density, 0.1, method=method)
    np.testing.assert_array_equal(sol.choice, [0, 0, 0])


def test_generous_budget_picks_the_cheapest_rule():
  rng = np.random.default_rng(5)
  cost, density, _ = _instance(rng, 12, 6, 2)
  for method in ("milp", "greedy"):
    sol = solve(cost, density, 1.0, method=method)
    np.testing.assert_array_equal(sol.choice, cost.argmin(axis=1))
    assert sol.method == method
  assert solve(cost, density, 1.0, method="milp").status == "optimal"


def test_allowed_rules_are_honoured():
  rng = np.random.default_rng(6)
  cost, density, budget = _instance(rng, 12, 6, 2, slack=(0.4, 0.6))
  allowed = np.ones(cost.shape, dtype=bool)
  allowed[np.arange(12), cost.argmin(axis=1)] = False  # forbid every head's cheapest rule
  allowed[0, :] = [False, False, True, False, False, False]  # head 0 has one choice
  expected = np.where(allowed, cost, np.inf).argmin(axis=1)
  for method in ("milp", "greedy"):
    sol = solve(cost, density, 1.0, allowed=allowed, method=method)
    np.testing.assert_array_equal(sol.choice, expected)
    sol = solve(cost, density, budget, allowed=allowed, method=method)
    _assert_feasible(sol, cost, density, budget, allowed=allowed)
    assert sol.choice[0] == 2


def test_auto_routes_by_problem_size():
  rng = np.random.default_rng(7)
  cost, density, budget = _instance(rng, 6, 4, 2)
  assert solve(cost, density, budget).method == "milp"
  assert solve(cost, density, budget, max_milp_variables=24).method == "milp"
  assert solve(cost, density, budget, max_milp_variables=23).method == "greedy"


def test_milp_time_limit_reports_the_dual_bound_or_falls_back(monkeypatch):
  rng = np.random.default_rng(8)
  cost, density, budget = _instance(rng, 6, 4, 2)
  exact = solve_milp(cost, density, budget, mip_rel_gap=0.0)
  real_milp = scipy.optimize.milp

  def stopped(found):
    def milp(*args, **kwargs):
      res = real_milp(*args, **kwargs)
      res.status, res.mip_dual_bound = 1, res.fun - 0.5  # as if stopped early (costs scaled)
      if not found:
        res.x = res.fun = None
      return res
    return milp

  monkeypatch.setattr(scipy.optimize, "milp", stopped(found=True))
  sol = solve_milp(cost, density, budget, time_limit=3)
  assert sol.method == "milp" and sol.status.startswith("time limit reached after 3 s (gap ")
  assert sol.objective == exact.objective and sol.bound < sol.objective and sol.gap > 0

  monkeypatch.setattr(scipy.optimize, "milp", stopped(found=False))
  sol = solve_milp(cost, density, budget, time_limit=3)
  assert sol.method == "greedy" and "no feasible plan within the time limit (3 s)" in sol.status
  _assert_feasible(sol, cost, density, budget)


def test_milp_plan_that_overshoots_after_rounding_is_resolved(monkeypatch):
  # Rule 2 is rule 1 plus a hair: HiGHS's tolerances could accept it at a budget rule 1 just meets.
  density = np.array([[[0.2], [0.8], [0.8 + 1e-7]]] * 2)
  cost = np.array([[1.0, 0.0, 0.0]] * 2)
  real_milp = scipy.optimize.milp
  calls = []

  def milp(*args, **kwargs):
    res = real_milp(*args, **kwargs)
    if not calls:  # the first plan: head 0 on rule 2, head 1 on rule 0, 1e-7 over the budget
      res.x = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    calls.append(kwargs["constraints"][1].ub.copy())
    return res

  monkeypatch.setattr(scipy.optimize, "milp", milp)
  sol = solve_milp(cost, density, 0.5)
  assert len(calls) == 2 and calls[1][0] < calls[0][0]
  assert sol.method == "milp" and sol.objective == 1.0
  _assert_feasible(sol, cost, density, 0.5)
  assert sorted(sol.choice.tolist()) == [0, 1]

  calls.clear()  # a first plan far over budget: the tightened problem has no plan, greedy steps in

  def far_over(*args, **kwargs):
    res = real_milp(*args, **kwargs)
    if not calls:
      res.x = np.array([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    calls.append(1)
    return res

  monkeypatch.setattr(scipy.optimize, "milp", far_over)
  sol = solve_milp(cost, density, 0.5)
  assert sol.method == "greedy" and "overshot a budget" in sol.status
  _assert_feasible(sol, cost, density, 0.5)


_COST, _DENSITY = np.zeros((2, 3)), np.full((2, 3, 2), 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cost=np.zeros(3)), r"cost has shape \(3,\); expected \[n_heads_total, n_rules\]"),
    (dict(density=np.full((2, 4, 2), 0.5)), r"density has shape \(2, 4, 2\); expected"),
    (dict(cost=np.array([[0.0, np.nan, 0.0]] * 2)), r"cost\[0, 1\] = nan .* finite"),
    (dict(density=np.zeros((2, 3, 2))), r"density\[0, 0, 0\] = 0\.0 .* in \(0, 1\]"),
    (dict(density=np.full((2, 3, 2), 1.5)), r"density\[0, 0, 0\] = 1\.5"),
    (dict(budget=0.0), r"budget = 0\.0 at length index 0 is not allowed: .* \(0, 1\]"),
    (dict(budget=[0.5, 1.2]), r"budget = 1\.2 at length index 1"),
    (dict(budget=[0.5, 0.5, 0.5]), r"budget has shape \(3,\); expected a float or one value"),
    (dict(allowed=np.ones((2, 3))), r"allowed has shape \(2, 3\) and dtype float64; expected"),
    (dict(allowed=np.array([[True] * 3, [False] * 3])), r"head 1 has no allowed rule"),
    (dict(layer_budget=0.5), r"layer_budget is set but layer_of is None"),
    (dict(layer_of=[0.0, 1.0], layer_budget=0.5), r"layer_of has shape \(2,\) and dtype float"),
    (dict(layer_of=[0, 1], layer_budget=2.0), r"layer_budget = 2\.0"),
    (dict(lengths=[1024]), r"lengths has 1 entries; expected one per profiled length \(2\)"),
    (dict(method="exact"), r"method = 'exact' is not allowed: expected one of"),
    (dict(time_limit=0), r"time_limit = 0 is not allowed"),
    (dict(max_milp_variables=-1), r"max_milp_variables = -1 is not allowed"),
    (dict(mip_rel_gap=1.0), r"mip_rel_gap = 1\.0 is not allowed"),
])
def test_bad_inputs_raise_clear_errors(kwargs, message):
  args = dict(cost=_COST, density=_DENSITY, budget=0.5) | kwargs
  with pytest.raises(SearchInputError, match=message) as err:
    solve(args.pop("cost"), args.pop("density"), args.pop("budget"), **args)
  assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_solution_is_frozen():
  sol = solve(_COST, _DENSITY, 0.5)
  with pytest.raises(AttributeError):
    sol.objective = 0.0
  assert isinstance(sol, search.Solution)


def _kv_brute_force(cost, density, budget, kv_group, kv, kv_budget):
  """Least objective under the density budget and the group-max KV budget, by enumeration."""
  n_heads, n_rules, _ = density.shape
  heads = np.arange(n_heads)
  groups = np.unique(kv_group)
  best = None
  for choice in itertools.product(range(n_rules), repeat=n_heads):
    choice = np.array(choice)
    if (density[heads, choice].mean(axis=0) > budget * (1 + 1e-9)).any():
      continue
    parts = kv[heads, choice]                                      # [H, N, P]
    used = sum(parts[kv_group == g].max(axis=0) for g in groups).sum(axis=-1)  # [N]
    if (used > kv_budget * len(groups) * (1 + 1e-9)).any():
      continue
    obj = cost[heads, choice].sum()
    best = obj if best is None else min(best, obj)
  return best


def test_milp_with_kv_budget_matches_brute_force():
  """GQA: heads sharing a KV head pay for their widest; the MILP's auxiliary maxima are exact."""
  rng = np.random.default_rng(7)
  kv_group = np.array([0, 0, 1, 1, 2])
  n_feasible = n_binding = 0
  for _ in range(25):
    cost, density, budget = _instance(rng, 5, 3, 2, nested=True, slack=(0.5, 1.0))
    # Two parts per head (sinks, ring), as `search_plan` gives them; the ring grows with density.
    kv = np.stack([np.full(density.shape, 0.02), density], axis=-1)
    kv_budget = rng.uniform(0.3, 0.9, size=2)
    best = _kv_brute_force(cost, density, budget, kv_group, kv, kv_budget)
    kw = dict(kv_group=kv_group, kv_slots=kv, kv_budget=kv_budget)
    if best is None:
      with pytest.raises(InfeasibleBudgetError):
        solve_milp(cost, density, budget, mip_rel_gap=0.0, **kw)
      continue
    n_feasible += 1
    sol = solve(cost, density, budget, mip_rel_gap=0.0, **kw)       # auto → milp
    assert sol.method == "milp" and sol.status == "optimal"
    np.testing.assert_allclose(sol.objective, best, rtol=1e-9, atol=1e-9)
    n_binding += not np.isclose(best, _brute_force(cost, density, budget))
    assert lp_bound(cost, density, budget, **kw) <= best + 1e-9
  assert n_feasible >= 10 and n_binding >= 3  # the KV budget changed the optimum in some


def test_kv_budget_bad_inputs_and_greedy():
  rng = np.random.default_rng(0)
  cost, density, budget = _instance(rng, 4, 3, 2)
  kv = np.stack([np.zeros_like(density), density], -1)
  group = np.array([0, 0, 1, 1])
  with pytest.raises(SearchInputError, match="together"):
    solve(cost, density, budget, kv_budget=0.5)
  with pytest.raises(SearchInputError, match="kv_group"):
    solve(cost, density, budget, kv_group=np.array([0, 1]), kv_slots=kv, kv_budget=0.5)
  with pytest.raises(SearchInputError, match="kv_slots"):
    solve(cost, density, budget, kv_group=group, kv_slots=kv[:, :2], kv_budget=0.5)
  with pytest.raises(SearchInputError, match="kv_budget"):
    solve(cost, density, budget, kv_group=group, kv_slots=kv, kv_budget=1.5)
  with pytest.raises(SearchInputError, match="greedy"):
    solve(cost, density, budget, method="greedy", kv_group=group, kv_slots=kv, kv_budget=0.5)
  with pytest.raises(InfeasibleBudgetError, match="KV budget"):
    solve(cost, np.full_like(density, 0.05), 0.5, kv_group=group,
          kv_slots=np.full(kv.shape, 0.4), kv_budget=0.5)


def test_kv_floor_counts_a_heads_whole_total():
  """Sinks smallest in one rule and the span in another: no rule has both, so the floor is
  the least total per head (0.5 here), not the sum of the parts' minima (0.1)."""
  cost = np.zeros((2, 2))
  density = np.full((2, 2, 1), 0.1)
  kv = np.array([[[[0.0, 0.5]], [[0.4, 0.1]]]] * 2)   # rule 0: (0, 0.5), rule 1: (0.4, 0.1)
  with pytest.raises(InfeasibleBudgetError, match="at least 0.5"):
    solve(cost, density, 0.5, kv_group=[0, 0], kv_slots=kv, kv_budget=0.3)
  sol = solve(cost, density, 0.5, kv_group=[0, 0], kv_slots=kv, kv_budget=0.5)
  assert sol.status == "optimal"
