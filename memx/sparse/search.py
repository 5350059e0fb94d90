"""MoA plan search: one sparse-attention rule per head, least predicted loss within density budgets.

MoA (Mixture of Attention spans, Fu et al. 2024) profiles, for every attention head ``i`` (all
layers together, ``H`` heads) and candidate rule ``r``, the predicted loss increase ``c[i, r]`` and
the density ``d[i, r, n]`` (fraction of the causal query-key pairs the head visits) at each
profiled sequence length ``n``. The plan is the binary choice ``x[i, r]``::

    minimise    sum_{i,r} c[i,r] x[i,r]
    subject to  sum_r x[i,r] = 1                                  every head i
                sum_{i,r} d[i,r,n] x[i,r] <= B[n] * H             every length n
                sum_{i in l, r} d[i,r,n] x[i,r] <= B_L[n] * H_l   every layer l and length n
                x[i,r] in {0, 1};  x[i,r] = 0 where head i may not use rule r

``B`` bounds the average density over all heads, ``B_L`` (optional) over the ``H_l`` heads of
each layer.

KV-memory budget (optional, MILP only). Heads that share a KV head (GQA) share its cache, which
must hold the keys of the widest of them: the KV memory of group ``g`` is a *max* over its heads,
not a sum. With ``kv[i, r, n, p]`` the slots head ``i`` needs under rule ``r`` at length ``n``, as a
fraction of ``n``, in ``P`` parts that the cache sizes separately (the sinks and the ring of
`attention_decode.ring_layout`: a group keeps max sinks + max span), the budget is::

    sum_{g,p} max_{i in g} sum_r kv[i,r,n,p] x[i,r] <= K[n] * G       every length n

with ``G`` groups. The MILP writes each max with a continuous ``y[g, n, p] >= sum_r kv[i,r,n,p]
x[i,r]`` for every head ``i`` of ``g``, and bounds ``sum_{g,p} y[g,n,p]``: since the cost does not
depend on ``y``, a plan meets the budget exactly when some ``y`` does, so the program is still
exact. Greedy handles sums only and refuses a KV budget.

Why the MILP is exact: the objective and every budget are sums of per-head terms, so the
integer program above *is* the planning problem, with no approximation. `solve_milp` hands it to
HiGHS (`scipy.optimize.milp`), whose branch and bound proves optimality up to `mip_rel_gap`
(0 asks for an exact proof); HiGHS meets constraints up to ~1e-7, so the rounded plan is re-checked
against the budgets here and re-solved with a tightened budget in the rare case it overshoots.

What greedy guarantees: feasibility, not optimality. `solve_greedy` starts every head at its
sparsest allowed rule (least ``max_n d[i,r,n] / B[n]``; a short repair phase fixes the rare case
where those choices break a budget jointly), then repeatedly applies the single-head change of rule
with the best ratio of cost decrease to budget use (the largest density increase over the
head's constraints and lengths, each divided by that constraint's remaining slack), among changes
that keep every budget met, until no such change lowers the cost. Each step lowers the objective,
so it terminates.

Gap: ``gap = (objective - bound) / max(|objective|, 1e-12)`` where ``bound`` is a proven lower
bound on the optimum: the objective itself when the MILP proved exact optimality, HiGHS's dual
bound when it stopped at its gap tolerance or time limit, and the LP relaxation (`lp_bound`,
``0 <= x <= 1`` instead of ``{0, 1}``) for greedy plans. A basic LP optimum has no more fractional
heads than budget rows, so over many heads the LP bound sits close to the true optimum and the
greedy gap fairly measures what greedy gave up.
"""

import dataclasses
import heapq
import math
import numbers
import time
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

from memx.errors import UserError

__all__ = [
    "InfeasibleBudgetError", "NoPlanFoundError", "SearchInputError", "Solution", "lp_bound",
    "solve", "solve_greedy", "solve_milp",
]

# A plan meets a budget when its summed density is <= capacity * (1 + _RTOL): exact ties with the
# budget survive float summation order.
_RTOL = 1e-9
_METHODS = ("auto", "milp", "greedy")


class SearchInputError(UserError, ValueError):
  """The arrays or budgets given to the plan search are malformed."""


class InfeasibleBudgetError(UserError):
  """No choice of one allowed rule per head meets the density budgets."""


class NoPlanFoundError(UserError):
  """Greedy found no plan within the budgets, though none is proven impossible."""


@dataclasses.dataclass(frozen=True)
class Solution:
  choice: np.ndarray  # int [n_heads_total], rule index per head
  objective: float  # sum of cost[i, choice[i]]
  bound: float  # proven lower bound on the optimum
  gap: float  # (objective - bound) / max(|objective|, 1e-12), >= 0
  method: str  # "milp" or "greedy"
  densities: np.ndarray  # float [n_lengths], achieved average density over all heads per length
  status: str  # human readable


@dataclasses.dataclass(frozen=True)
class _Problem:
  """Validated inputs; budgets become constraint groups: group 0 is all heads, 1 + l is layer l."""

  cost: np.ndarray  # [H, R]
  density: np.ndarray  # [H, R, N]
  allowed: np.ndarray  # [H, R] bool
  budget: np.ndarray  # [N]
  lengths: tuple  # N labels for messages
  layer_ids: np.ndarray | None  # [L] the caller's layer numbers
  layer_budget: np.ndarray | None  # [N]
  head_groups: np.ndarray  # [H, K] int: the constraint groups each head belongs to
  caps: np.ndarray  # [G, N]: the summed density each group may use
  group_sizes: np.ndarray  # [G]
  kv_group: np.ndarray | None = None  # [H] int in [0, Gkv): each head's KV head
  kv: np.ndarray | None = None  # [H, R, N, P]: KV slots per part, as fractions of the length
  kv_caps: np.ndarray | None = None  # [N]: kv_budget * Gkv

  @property
  def n_kv_groups(self) -> int:
    return 0 if self.kv_group is None else int(self.kv_group.max()) + 1

  def kv_usage(self, choice: np.ndarray) -> np.ndarray:
    """[N]: the summed KV memory of all groups (fractions of the length) under a plan."""
    parts = self.kv[np.arange(self.n_heads), choice]  # [H, N, P]
    most = np.zeros((self.n_kv_groups, *parts.shape[1:]))
    np.maximum.at(most, self.kv_group, parts)
    return most.sum(axis=(0, 2))

  def kv_violated(self, choice: np.ndarray) -> np.ndarray:
    if self.kv is None:
      return np.zeros(self.n_lengths, bool)
    return self.kv_usage(choice) > self.kv_caps * (1 + _RTOL)

  @property
  def n_heads(self) -> int:
    return self.cost.shape[0]

  @property
  def n_lengths(self) -> int:
    return self.density.shape[2]

  def usage(self, per_head: np.ndarray) -> np.ndarray:
    """[H, N] densities → [G, N] summed per constraint group."""
    out = np.zeros(self.caps.shape)
    for k in range(self.head_groups.shape[1]):
      np.add.at(out, self.head_groups[:, k], per_head)
    return out

  def violated(self, usage: np.ndarray) -> np.ndarray:
    return usage > self.caps * (1 + _RTOL)

  def chosen_density(self, choice: np.ndarray) -> np.ndarray:
    return self.density[np.arange(self.n_heads), choice]

  def group_name(self, g: int) -> str:
    return "all heads" if g == 0 else f"layer {self.layer_ids[g - 1]}"

  def budget_of(self, g: int, n: int) -> float:
    return float(self.budget[n] if g == 0 else self.layer_budget[n])

  def length_name(self, n: int) -> str:
    return f"length {self.lengths[n]}"


def _budget_array(value, n_lengths: int, name: str) -> np.ndarray:
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim == 0:
    arr = np.full(n_lengths, float(arr))
  if arr.shape != (n_lengths,):
    raise SearchInputError(
        f"{name} has shape {arr.shape}; expected a float or one value per profiled length "
        f"({n_lengths}, the last axis of density).")
  bad = ~(np.isfinite(arr) & (arr > 0) & (arr <= 1))
  if bad.any():
    n = int(np.argmax(bad))
    raise SearchInputError(
        f"{name} = {float(arr[n])!r} at length index {n} is not allowed: budgets are average "
        "densities in (0, 1].")
  return arr


def _prepare_kv(kv_group, kv_slots, kv_budget, n_heads, n_rules, n_lengths):
  """Validates the KV-budget inputs: all three or none."""
  given = [x is not None for x in (kv_group, kv_slots, kv_budget)]
  if not any(given):
    return None, None, None
  if not all(given):
    raise SearchInputError(
        "a KV-memory budget needs kv_group, kv_slots and kv_budget together (got "
        + ", ".join(n for n, g in zip(("kv_group", "kv_slots", "kv_budget"), given, strict=True)
                    if g) + " only).")
  kv_group = np.asarray(kv_group)
  if kv_group.shape != (n_heads,) or not np.issubdtype(kv_group.dtype, np.integer) \
      or kv_group.min() < 0:
    raise SearchInputError(
        f"kv_group has shape {kv_group.shape} and dtype {kv_group.dtype}; expected one KV-head "
        f"index >= 0 per head ({n_heads}).")
  _, kv_group = np.unique(kv_group, return_inverse=True)
  kv = np.asarray(kv_slots, dtype=np.float64)
  if kv.ndim == 3:
    kv = kv[..., None]
  if kv.ndim != 4 or kv.shape[:3] != (n_heads, n_rules, n_lengths):
    raise SearchInputError(
        f"kv_slots has shape {kv.shape}; expected [n_heads_total, n_rules, n_lengths] or "
        f"[..., n_parts] = [{n_heads}, {n_rules}, {n_lengths}(, P)].")
  if not (np.isfinite(kv) & (kv >= 0)).all():
    raise SearchInputError("kv_slots must be finite and >= 0 (fractions of the length).")
  kv_caps = _budget_array(kv_budget, n_lengths, "kv_budget") * (int(kv_group.max()) + 1)
  return kv_group.astype(np.int64), kv, kv_caps


def _prepare(cost, density, budget, layer_of, layer_budget, allowed, lengths,
             kv_group=None, kv_slots=None, kv_budget=None) -> _Problem:
  cost = np.asarray(cost, dtype=np.float64)
  density = np.asarray(density, dtype=np.float64)
  if cost.ndim != 2 or cost.shape[0] < 1 or cost.shape[1] < 1:
    raise SearchInputError(
        f"cost has shape {cost.shape}; expected [n_heads_total, n_rules] with at least one head "
        "and one rule.")
  n_heads, n_rules = cost.shape
  if density.ndim != 3 or density.shape[:2] != cost.shape or density.shape[2] < 1:
    raise SearchInputError(
        f"density has shape {density.shape}; expected [n_heads_total, n_rules, n_lengths] = "
        f"[{n_heads}, {n_rules}, n_lengths >= 1] to match cost {cost.shape}.")
  n_lengths = density.shape[2]
  if not np.isfinite(cost).all():
    i, r = np.argwhere(~np.isfinite(cost))[0]
    raise SearchInputError(
        f"cost[{i}, {r}] = {float(cost[i, r])!r} is not allowed: costs must be finite (forbid a "
        "rule with `allowed` instead).")
  bad = ~(np.isfinite(density) & (density > 0) & (density <= 1))
  if bad.any():
    i, r, n = np.argwhere(bad)[0]
    raise SearchInputError(
        f"density[{i}, {r}, {n}] = {float(density[i, r, n])!r} is not allowed: densities are "
        "fractions of the causal attention pairs, in (0, 1].")
  if allowed is None:
    allowed = np.ones(cost.shape, dtype=bool)
  else:
    allowed = np.asarray(allowed)
    if allowed.shape != cost.shape or allowed.dtype != np.bool_:
      raise SearchInputError(
          f"allowed has shape {allowed.shape} and dtype {allowed.dtype}; expected a bool mask "
          f"of shape {cost.shape} (like cost).")
  empty = ~allowed.any(axis=1)
  if empty.any():
    raise SearchInputError(
        f"head {int(np.argmax(empty))} has no allowed rule ({int(empty.sum())} heads in all); "
        "every head needs at least one.")
  budget = _budget_array(budget, n_lengths, "budget")
  if lengths is None:
    lengths = tuple(f"#{n}" for n in range(n_lengths))
  else:
    lengths = tuple(lengths)
    if len(lengths) != n_lengths:
      raise SearchInputError(
          f"lengths has {len(lengths)} entries; expected one per profiled length ({n_lengths}).")

  head_groups = np.zeros((n_heads, 1), dtype=np.int64)
  group_sizes = np.array([n_heads])
  caps = budget[None, :] * n_heads
  layer_ids = layer_budget_arr = None
  if layer_budget is not None:
    if layer_of is None:
      raise SearchInputError("layer_budget is set but layer_of is None; give each head's layer.")
    layer_budget_arr = _budget_array(layer_budget, n_lengths, "layer_budget")
  if layer_of is not None:
    layer_of = np.asarray(layer_of)
    if layer_of.shape != (n_heads,) or not np.issubdtype(layer_of.dtype, np.integer):
      raise SearchInputError(
          f"layer_of has shape {layer_of.shape} and dtype {layer_of.dtype}; expected an int "
          f"array with one layer index per head ({n_heads}).")
  if layer_budget_arr is not None:
    layer_ids, layer = np.unique(layer_of, return_inverse=True)
    head_groups = np.stack([head_groups[:, 0], 1 + layer], axis=1)
    sizes = np.bincount(layer, minlength=len(layer_ids))
    group_sizes = np.concatenate([group_sizes, sizes])
    caps = np.concatenate([caps, sizes[:, None] * layer_budget_arr[None, :]], axis=0)
  kv_group, kv, kv_caps = _prepare_kv(kv_group, kv_slots, kv_budget, n_heads, n_rules,
                                      n_lengths)
  return _Problem(cost, density, allowed, budget, lengths, layer_ids, layer_budget_arr,
                  head_groups, caps, group_sizes, kv_group, kv, kv_caps)


def _check_feasible(p: _Problem) -> None:
  """Raise InfeasibleBudgetError when even the sparsest allowed rules break a budget."""
  if p.kv is not None:
    # Two lower bounds on a group's KV memory sum_p max_i kv[i, r_i, p], whatever the plan:
    # sum_p max_i min_r kv[i, r, p] (each part at its smallest), and max_i min_r sum_p kv[i, r, p]
    # (the group holds at least its largest head's total). Their max bounds every plan.
    kv = np.where(p.allowed[:, :, None, None], p.kv, np.inf)
    part_least, total_least = kv.min(axis=1), kv.sum(axis=3).min(axis=1)  # [H, N, P], [H, N]
    by_part = np.zeros((p.n_kv_groups, *part_least.shape[1:]))
    np.maximum.at(by_part, p.kv_group, part_least)
    by_total = np.zeros((p.n_kv_groups, total_least.shape[1]))
    np.maximum.at(by_total, p.kv_group, total_least)
    need = np.maximum(by_part.sum(axis=2), by_total).sum(axis=0)
    bad = need > p.kv_caps * (1 + _RTOL)
    if bad.any():
      n = int(np.argmax(need / p.kv_caps))
      floor = need[n] / p.n_kv_groups
      raise InfeasibleBudgetError(
          f"KV budget {p.kv_caps[n] / p.n_kv_groups:.4g} at {p.length_name(n)} is infeasible: "
          f"the smallest allowed rules keep {floor:.4g} of the dense KV cache there; raise the "
          f"KV budget to at least {floor:.4g} or allow rules with shorter spans.")
  sparsest = np.where(p.allowed[:, :, None], p.density, np.inf).min(axis=1)  # [H, N]
  usage = p.usage(sparsest)
  bad = p.violated(usage)
  if not bad.any():
    return
  # Name the worst violation (by how far over budget), and how many others there are.
  over = np.where(bad, usage / p.caps, -np.inf)
  g, n = np.unravel_index(int(np.argmax(over)), over.shape)
  avg = usage[g, n] / p.group_sizes[g]
  what = "density budget" if g == 0 else f"layer budget for {p.group_name(g)}"
  whose = "" if g == 0 else f" of its {p.group_sizes[g]} heads"
  more = int(bad.sum()) - 1
  raise InfeasibleBudgetError(
      f"{what} {p.budget_of(g, n):.4g} at {p.length_name(n)} is infeasible: the sparsest allowed "
      f"rules{whose} average {avg:.4g} there"
      + (f" ({more} other budget/length pairs are infeasible too)" if more else "")
      + f"; raise the budget to at least {avg:.4g} or allow sparser rules.")


def _joint_infeasible(p: _Problem, proven_by: str) -> InfeasibleBudgetError:
  if p.kv is not None:
    return InfeasibleBudgetError(
        f"no choice of one allowed rule per head meets the density and KV budgets at once "
        f"({proven_by}): rules sparse enough for the density budget keep too many keys per KV "
        "head (or the reverse). Raise the KV or density budget, or allow other rules.")
  return InfeasibleBudgetError(
      "no choice of one allowed rule per head meets every density budget at once "
      f"({proven_by}): each budget alone is reachable, but the rules that are sparsest at one "
      "length are too dense at another. Raise the budgets or allow rules that are sparse at "
      "every profiled length.")


@dataclasses.dataclass(frozen=True)
class _LP:
  """The program's matrices. Columns: the allowed (head, rule) pairs (binary), then with a KV
  budget the continuous y[g, n, p] (see module docstring). Rows of a_ub: the density budgets
  (caps, group-major), then the KV budget per length, then the y definitions (rhs 0)."""

  vh: np.ndarray
  vr: np.ndarray
  a_eq: scipy.sparse.csr_array
  a_ub: scipy.sparse.csr_array
  b_ub: np.ndarray
  n_aux: int

  @property
  def integrality(self) -> np.ndarray:
    return np.concatenate([np.ones(self.vh.size), np.zeros(self.n_aux)])

  @property
  def upper(self) -> np.ndarray:
    return np.concatenate([np.ones(self.vh.size), np.full(self.n_aux, np.inf)])

  def cost(self, p: _Problem, scale: float) -> np.ndarray:
    return np.concatenate([p.cost[self.vh, self.vr] / scale, np.zeros(self.n_aux)])


def _lp_matrices(p: _Problem) -> _LP:
  vh, vr = np.nonzero(p.allowed)
  n_vars = vh.size
  cols = np.arange(n_vars)
  n_len = p.n_lengths
  n_parts = 0 if p.kv is None else p.kv.shape[3]
  n_aux = p.n_kv_groups * n_len * n_parts
  width = n_vars + n_aux
  a_eq = scipy.sparse.csr_array((np.ones(n_vars), (vh, cols)), shape=(p.n_heads, width))
  rows = (p.head_groups[vh][:, :, None] * n_len + np.arange(n_len)[None, None, :])  # [V, K, N]
  vals = np.broadcast_to(p.density[vh, vr][:, None, :], rows.shape)
  entries = [(vals.ravel(), rows.ravel(),
              np.broadcast_to(cols[:, None, None], rows.shape).ravel())]
  b_ub = [p.caps.ravel()]
  if n_aux:
    aux = n_vars + np.arange(n_aux).reshape(p.n_kv_groups, n_len, n_parts)  # y[g, n, p]
    base = p.caps.size
    # KV budget rows: sum_{g,p} y[g, n, p] <= kv_caps[n]
    entries.append((np.ones(n_aux), base + np.broadcast_to(
        np.arange(n_len)[None, :, None], aux.shape).ravel(), aux.ravel()))
    b_ub.append(p.kv_caps)
    # Definition rows, one per (head, n, p): sum_r kv[i,r,n,p] x[i,r] - y[g_i,n,p] <= 0
    base += n_len
    head_rows = base + np.arange(p.n_heads * n_len * n_parts).reshape(p.n_heads, n_len, n_parts)
    entries.append((p.kv[vh, vr].ravel(), np.broadcast_to(
        head_rows[vh], (n_vars, n_len, n_parts)).ravel(),
        np.broadcast_to(cols[:, None, None], (n_vars, n_len, n_parts)).ravel()))
    entries.append((-np.ones(head_rows.size), head_rows.ravel(),
                    aux[p.kv_group].ravel()))
    b_ub.append(np.zeros(head_rows.size))
  b_ub = np.concatenate(b_ub)
  data, r, c = (np.concatenate(x) for x in zip(*entries, strict=True))
  a_ub = scipy.sparse.csr_array((data, (r, c)), shape=(b_ub.size, width))
  return _LP(vh, vr, a_eq, a_ub, b_ub, n_aux)


def _cost_scale(p: _Problem) -> float:
  # HiGHS stops at an absolute gap of 1e-6 too: scale costs to O(1) so that it is negligible.
  scale = float(np.abs(np.where(p.allowed, p.cost, 0.0)).max())
  return scale if scale > 0 else 1.0


def _lp_bound(p: _Problem) -> float:
  lp = _lp_matrices(p)
  scale = _cost_scale(p)
  res = scipy.optimize.linprog(
      lp.cost(p, scale), A_ub=lp.a_ub, b_ub=lp.b_ub, A_eq=lp.a_eq, b_eq=np.ones(p.n_heads),
      bounds=np.stack([np.zeros_like(lp.upper), lp.upper], axis=1), method="highs")
  if res.status == 2:
    raise _joint_infeasible(p, "even the LP relaxation is infeasible")
  if res.status != 0:
    raise RuntimeError(f"LP relaxation failed: {res.message}")
  # HiGHS's dual objective would be the rigorous bound; the primal optimum equals it to ~1e-9.
  return float(res.fun) * scale


def _gap(objective: float, bound: float) -> float:
  return max(0.0, (objective - bound) / max(abs(objective), 1e-12))


def _solution(p: _Problem, choice, bound, method, status) -> Solution:
  choice = np.asarray(choice, dtype=np.int64)
  objective = float(p.cost[np.arange(p.n_heads), choice].sum())
  bound = min(float(bound), objective)
  densities = p.chosen_density(choice).mean(axis=0)
  return Solution(choice=choice, objective=objective, bound=bound, gap=_gap(objective, bound),
                  method=method, densities=densities, status=status)


def _milp(p: _Problem, time_limit: float, mip_rel_gap: float):
  """Returns (choice or None, proven lower bound or -inf, "optimal" | "time limit")."""
  lp = _lp_matrices(p)
  vh, vr = lp.vh, lp.vr
  scale = _cost_scale(p)
  c = lp.cost(p, scale)
  rhs = lp.b_ub.copy()
  n_budget = p.caps.size + (0 if p.kv is None else p.n_lengths)  # rows that are budgets
  deadline = time.monotonic() + time_limit
  # HiGHS meets constraints to ~1e-7; if the rounded plan then overshoots a budget, re-solve with
  # that budget tightened by the overshoot (rare, and at most a few times).
  for attempt in range(4):
    remaining = max(deadline - time.monotonic(), 1e-3)
    res = scipy.optimize.milp(
        c, integrality=lp.integrality, bounds=scipy.optimize.Bounds(0, lp.upper),
        constraints=[scipy.optimize.LinearConstraint(lp.a_eq, 1, 1),
                     scipy.optimize.LinearConstraint(lp.a_ub, -np.inf, rhs)],
        options={"time_limit": remaining, "disp": False, "mip_rel_gap": mip_rel_gap})
    dual = getattr(res, "mip_dual_bound", None)
    dual = float(dual) * scale if dual is not None and np.isfinite(dual) else -np.inf
    if attempt:  # a tightened problem's bound need not hold for the real one; its LP's does
      dual = min(dual, _lp_bound(p))
    if res.status == 2:
      if attempt:
        return None, dual, "tightened budgets infeasible"
      raise _joint_infeasible(p, "the MILP is infeasible")
    if res.x is None:
      if res.status == 1:
        return None, dual, "time limit"
      raise RuntimeError(f"MILP solver failed: {res.message}")
    x = np.zeros(p.cost.shape)
    x[vh, vr] = res.x[:vh.size]
    choice = np.argmax(x, axis=1)
    usage = p.usage(p.chosen_density(choice))
    over = (usage - p.caps * (1 + _RTOL)).ravel()
    if p.kv is not None:
      over = np.concatenate([over, p.kv_usage(choice) - p.kv_caps * (1 + _RTOL)])
    if not (over > 0).any():
      return choice, dual, "optimal" if res.status == 0 else "time limit"
    rhs[:n_budget] = np.where(over > 0, rhs[:n_budget] - 2 * over, rhs[:n_budget])
  return None, dual, "rounding overshoot"


def _greedy(p: _Problem) -> np.ndarray:
  heads = np.arange(p.n_heads)
  allowed = p.allowed
  budget = p.budget[None, None, :]
  # Start: each head's sparsest allowed rule (relative to the budget at each length); ties → cost.
  score = np.where(allowed, (p.density / budget).max(axis=2), np.inf)
  ties = score <= score.min(axis=1, keepdims=True) * (1 + 1e-12)
  choice = np.argmin(np.where(ties, p.cost, np.inf), axis=1)
  density_now = p.chosen_density(choice)
  usage = p.usage(density_now)
  groups = [p.head_groups[:, k] for k in range(p.head_groups.shape[1])]

  # Repair: the per-length sparsest rules can break budgets jointly (sparse at one length, dense
  # at another). Move the head whose change most reduces the total relative overshoot.
  while p.violated(usage).any():
    delta = p.density - density_now[:, None, :]  # [H, R, N]
    before = np.maximum(usage - p.caps, 0) / p.caps
    change = np.zeros(p.cost.shape)
    for g in groups:
      after = np.maximum(usage[g][:, None, :] + delta - p.caps[g][:, None, :], 0)
      change += (after / p.caps[g][:, None, :] - before[g][:, None, :]).sum(axis=2)
    change = np.where(allowed, change, np.inf)
    change[heads, choice] = np.inf
    best = np.argmin(change)
    if not change.flat[best] < -1e-12:
      return None
    i, r = np.unravel_index(best, change.shape)
    for g in groups:
      usage[g[i]] += delta[i, r]
    choice[i] = r
    density_now[i] = p.density[i, r]

  # Upgrades: best cost decrease per unit of the scarcest budget, among changes that fit. Scores
  # only fall while slack only shrinks, so a heap of per-head scores from earlier steps (upper
  # bounds) finds the best change with a few batched rescorings (lazy greedy) instead of rescoring
  # all heads × rules every step; its top is the best change once it was scored this step. A
  # change that frees budget somewhere can raise scores: then everything is rescored.
  heap = []  # (-free, -score, head, step scored at, rule)
  step = 0

  def push(hs):
    ok, (free, score), rule = _best_moves(p, hs, choice, usage)
    for j in np.flatnonzero(ok):
      heapq.heappush(heap, (-free[j], -score[j], int(hs[j]), step, int(rule[j])))

  def rescore_all():
    heap.clear()
    # Chunks of heads bound the [heads, groups, rules, lengths] temporaries to ~32 MB.
    chunk = max(1, 4_000_000 // p.density[0].size // p.head_groups.shape[1])
    for lo in range(0, p.n_heads, chunk):
      push(heads[lo:lo + chunk])

  rescore_all()
  batch = 16
  while heap:
    if heap[0][3] != step:  # the top's score is stale: rescore it and the next few together
      stale = [heapq.heappop(heap)[2] for _ in range(min(batch, len(heap)))]
      push(np.array(stale))
      batch = min(2 * batch, 1024)
      continue
    batch = 16
    _, _, i, _, r = heapq.heappop(heap)
    delta = p.density[i, r] - density_now[i]
    for g in groups:
      usage[g[i]] += delta
    choice[i] = r
    density_now[i] = p.density[i, r]
    step += 1
    if (delta < 0).any():
      rescore_all()
    else:
      push(np.array([i]))
  return choice


def _best_moves(p: _Problem, hs: np.ndarray, choice: np.ndarray, usage: np.ndarray):
  """Each head's best improving change of rule that fits the budgets now.

  Returns (ok [h], (free [h], score [h]), rule [h]): a change that lowers the cost without using
  any budget (free = 1, score = cost decrease) beats every other (free = 0, score = cost decrease
  / the largest density increase over the head's constraints and lengths, each divided by that
  constraint's slack)."""
  cur = choice[hs]
  delta = p.density[hs] - p.density[hs, cur][:, None, :]  # [h, R, N]
  gain = p.cost[hs, cur][:, None] - p.cost[hs]  # [h, R]
  g = p.head_groups[hs]  # [h, K]
  slack = (p.caps - usage)[g][:, :, None, :]  # [h, K, 1, N]
  tol = (p.caps * _RTOL)[g][:, :, None, :]
  floor = (p.caps * 1e-12)[g][:, :, None, :]
  fits = p.allowed[hs] & (gain > 0) & (delta[:, None] <= slack + tol).all(axis=(1, 3))
  use = (np.maximum(delta, 0)[:, None] / np.maximum(slack, floor)).max(axis=(1, 3))  # [h, R]
  free = fits & (use <= 0)
  any_free = free.any(axis=1)
  score = np.where(any_free[:, None], np.where(free, gain, -np.inf),
                   np.where(fits, gain / np.where(fits & (use > 0), use, 1.0), -np.inf))
  rule = np.argmax(score, axis=1)
  best = score[np.arange(len(hs)), rule]
  return fits.any(axis=1), (any_free.astype(np.float64), best), rule


def _check_time_limit(time_limit) -> float:
  if not (isinstance(time_limit, numbers.Real) and math.isfinite(time_limit) and time_limit > 0):
    raise SearchInputError(
        f"time_limit = {time_limit!r} is not allowed: a positive, finite number of seconds.")
  return float(time_limit)


def _greedy_solution(p: _Problem, note: str | None = None, dual: float = -np.inf) -> Solution:
  choice = _greedy(p)
  if choice is None:
    _lp_bound(p)  # raises InfeasibleBudgetError when the relaxation proves it impossible
    raise NoPlanFoundError(
        "greedy found no plan that meets every density budget at once (the rules sparsest at "
        "one length are too dense at another); one may still exist: use method='milp', or raise "
        "the budgets.")
  bound = max(_lp_bound(p), dual)  # a MILP that ran out of time may have proven more
  sol = _solution(p, choice, bound, "greedy", "")
  status = f"greedy (feasible, not proven optimal); gap {sol.gap:.3%} to the proven bound"
  if note:
    status = f"{note}; {status}"
  return dataclasses.replace(sol, status=status)


def solve_milp(cost, density, budget, *, layer_of=None, layer_budget=None, allowed=None,
               time_limit: float = 60.0, mip_rel_gap: float = 1e-4,
               lengths: Sequence | None = None, kv_group=None, kv_slots=None,
               kv_budget=None) -> Solution:
  """Exact plan by mixed-integer programming (HiGHS via `scipy.optimize.milp`).

  HiGHS stops once the plan is proven within `mip_rel_gap` of the optimum (its default 1e-4; the
  predicted costs are far noisier than that) or at `time_limit` seconds; `bound` is its dual bound
  and `gap` the proven distance. `mip_rel_gap=0` asks for a proof of exact optimality, which can
  take the whole time limit on a thousand heads. If the time limit passes before HiGHS finds any
  feasible plan, the greedy plan is returned (`method="greedy"`) and the status says so (with a
  KV budget, which greedy cannot honour, NoPlanFoundError is raised instead).
  `lengths` (optional) labels the profiled lengths in messages.

  KV-memory budget (optional, all three together; see the module docstring): kv_group [H] the
  KV head of each head (ids unique across layers), kv_slots [H, R, N] or [H, R, N, P] the slots
  each head needs per rule and length as fractions of the length (P parts, each sized by its
  group's widest head), kv_budget the bound on the summed groups' slots as a fraction of a
  dense cache (a float or one per length).
  """
  time_limit = _check_time_limit(time_limit)
  if not (isinstance(mip_rel_gap, numbers.Real) and 0 <= mip_rel_gap < 1):
    raise SearchInputError(f"mip_rel_gap = {mip_rel_gap!r} is not allowed: a number in [0, 1).")
  p = _prepare(cost, density, budget, layer_of, layer_budget, allowed, lengths, kv_group,
               kv_slots, kv_budget)
  _check_feasible(p)
  choice, dual, how = _milp(p, time_limit, float(mip_rel_gap))
  if choice is None:
    why = {"time limit": f"within the time limit ({time_limit:g} s)"}.get(
        how, "within HiGHS's tolerances (its rounded plans overshot a budget)")
    if p.kv is not None:
      raise NoPlanFoundError(f"the MILP found no plan within the density and KV budgets {why}; "
                             "raise time_limit or the budgets.")
    return _greedy_solution(p, f"MILP found no feasible plan {why}", dual)
  if how == "optimal" and (mip_rel_gap == 0 or not np.isfinite(dual)):
    # Proven optimal with a zero relative gap: the objective is its own bound.
    return _solution(p, choice, np.inf, "milp", "optimal")
  bound = dual if np.isfinite(dual) else _lp_bound(p)
  sol = _solution(p, choice, bound, "milp", "")
  if how == "optimal":
    status = ("optimal" if sol.gap == 0 else
              f"optimal within mip_rel_gap {mip_rel_gap:g} (gap {sol.gap:.4%})")
  else:
    status = f"time limit reached after {time_limit:g} s (gap {sol.gap:.3%})"
  return dataclasses.replace(sol, status=status)


def solve_greedy(cost, density, budget, *, layer_of=None, layer_budget=None, allowed=None,
                 lengths: Sequence | None = None) -> Solution:
  """Feasible plan by greedy upgrades from the sparsest rules; gap measured to the LP bound."""
  p = _prepare(cost, density, budget, layer_of, layer_budget, allowed, lengths)
  _check_feasible(p)
  return _greedy_solution(p)


def lp_bound(cost, density, budget, *, layer_of=None, layer_budget=None, allowed=None,
             lengths: Sequence | None = None, kv_group=None, kv_slots=None,
             kv_budget=None) -> float:
  """Optimum of the LP relaxation (0 <= x <= 1): a lower bound on every plan's objective."""
  p = _prepare(cost, density, budget, layer_of, layer_budget, allowed, lengths, kv_group,
               kv_slots, kv_budget)
  _check_feasible(p)
  return _lp_bound(p)


def solve(cost, density, budget, *, layer_of=None, layer_budget=None, allowed=None,
          method: str = "auto", time_limit: float = 60.0, max_milp_variables: int = 200_000,
          mip_rel_gap: float = 1e-4, lengths: Sequence | None = None, kv_group=None,
          kv_slots=None, kv_budget=None) -> Solution:
  """Best plan under the budgets; `method="auto"` uses the MILP when n_heads * n_rules is at most
  `max_milp_variables` or a KV budget is given (see `solve_milp`), greedy otherwise. Inputs are
  checked, and budgets that even the sparsest allowed rules break are reported
  (InfeasibleBudgetError), before any solve."""
  if method not in _METHODS:
    raise SearchInputError(f"method = {method!r} is not allowed: expected one of {_METHODS}.")
  if not (isinstance(max_milp_variables, numbers.Integral) and max_milp_variables >= 0):
    raise SearchInputError(
        f"max_milp_variables = {max_milp_variables!r} is not allowed: a non-negative int.")
  time_limit = _check_time_limit(time_limit)
  kw = dict(layer_of=layer_of, layer_budget=layer_budget, allowed=allowed, lengths=lengths)
  kv = dict(kv_group=kv_group, kv_slots=kv_slots, kv_budget=kv_budget)
  has_kv = any(x is not None for x in kv.values())
  if method == "auto":
    shape = np.shape(cost)
    small = len(shape) == 2 and shape[0] * shape[1] <= max_milp_variables
    method = "milp" if small or has_kv else "greedy"
  if method == "milp":
    return solve_milp(cost, density, budget, time_limit=time_limit, mip_rel_gap=mip_rel_gap,
                      **kw, **kv)
  if has_kv:
    raise SearchInputError("a KV-memory budget needs method 'milp' (or 'auto'): greedy handles "
                           "summed density budgets only, not the max over heads sharing a KV "
                           "head.")
  return solve_greedy(cost, density, budget, **kw)
