"""MoA's per-head attention rules: a span α + β·N that scales with the length N, plus sinks.

A rule (α, β, n_sink) lets each query see the span(N) = clip(round(α + β·N), 1, N) most recent
keys (itself included) and the first n_sink keys, causally (`elastic_mask`). Densities here are
fractions of the *causal* pairs, N(N+1)/2, so dense causal attention has density 1 and a
density budget is directly the fraction of attention work and of causal pairs kept. In closed
form, with w = span(N) and s = min(n_sink, N):

  visited(w, s, N) = Σ_{i=1..N} min(i, w)  +  Σ_{j=1..N-w} min(j, s)
                   = tri(N, w) + tri(N - w, s),   tri(n, c) = c(c+1)/2 + (n - c)·c  for c <= n
                                                            = n(n+1)/2              for c >= n

(row i sees min(i, w) band keys, and the sinks the band no longer covers: min(s, i - w)).
So density(N) = visited / (N(N+1)/2): (α + β·N)/N with the causal start, the clipping and the
sinks accounted for exactly (tested against `Mask.density` and element-wise counting).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from memx.kernels.attention import Mask, elastic_mask, elastic_span


@dataclasses.dataclass(frozen=True, order=True)
class Rule:
  """One head's length-elastic rule; `full()` is dense causal attention at any length."""

  alpha: float
  beta: float
  n_sink: int = 0

  def __post_init__(self):
    if not (math.isfinite(self.alpha) and math.isfinite(self.beta)):
      raise ValueError(f"Rule: alpha = {self.alpha}, beta = {self.beta} must be finite.")
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"Rule: beta = {self.beta} must lie in [0, 1] (span grows with N at "
                       "most as fast as N).")
    if not isinstance(self.n_sink, int | np.integer) or self.n_sink < 0:
      raise ValueError(f"Rule: n_sink = {self.n_sink!r} must be an int >= 0.")
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "beta", float(self.beta))
    object.__setattr__(self, "n_sink", int(self.n_sink))

  @staticmethod
  def full() -> Rule:
    return Rule(0.0, 1.0, 0)

  def span(self, length: int) -> int:
    return elastic_span(self.alpha, self.beta, length)

  def is_dense(self, length: int) -> bool:
    return self.span(length) >= length

  def as_tuple(self) -> tuple[float, float, int]:
    return (self.alpha, self.beta, self.n_sink)


def _tri(n: int, c: int) -> int:
  """Σ_{i=1..n} min(i, c) for n >= 0, c >= 0."""
  if n <= 0:
    return 0
  if c >= n:
    return n * (n + 1) // 2
  return c * (c + 1) // 2 + (n - c) * c


def causal_pairs(length: int) -> int:
  return length * (length + 1) // 2


def visited_pairs(rule: Rule, length: int) -> int:
  """Exact number of (query, key) pairs the rule visits in causal attention over N tokens."""
  w, s = rule.span(length), min(rule.n_sink, length)
  return _tri(length, w) + _tri(length - w, s)


def density(rule: Rule, length: int) -> float:
  """Fraction of the causal pairs the rule visits at length N (closed form, see module doc)."""
  return visited_pairs(rule, length) / causal_pairs(length)


def mask_density(mask: Mask, length: int) -> np.ndarray:
  """Per-head fraction of causal pairs a (per-head) mask visits: float [H or 1]."""
  return mask.visited_pairs(length, length) / causal_pairs(length)


def rules_mask(rules: Sequence[Rule], length: int) -> Mask:
  """The per-head Mask of one layer's rules at length N."""
  return elastic_mask([r.as_tuple() for r in rules], length)


def kv_slots(rule: Rule, length: int) -> int:
  """Keys a head must keep while decoding at length N: its span plus the sinks outside it."""
  w = rule.span(length)
  return min(length, w + min(rule.n_sink, length))


def candidate_rules(lengths: Sequence[int], *, n_alphas: int = 10, n_betas: int = 12,
                    n_sink: int = 4, include_full: bool = True) -> list[Rule]:
  """MoA's candidate grid: α from 0 up to the longest length, β from 0 up to 0.9.

  Both are spaced geometrically after a 0 (short local heads and small slopes need fine steps,
  long ones do not; a uniform β grid is too coarse at the budgets that matter, 10–50%): α in
  {0} ∪ geomspace(4, max N), β in {0} ∪ geomspace(1/64, 0.9). Rules dense at every profiled
  length are dropped (they duplicate `Rule.full()`, added when include_full). Sorted, unique.
  """
  if not lengths:
    raise ValueError("candidate_rules: give at least one length.")
  if n_alphas < 1 or n_betas < 1:
    raise ValueError(f"candidate_rules: n_alphas = {n_alphas}, n_betas = {n_betas} must be >= 1.")
  top = max(lengths)
  alphas = [0.0] + ([float(round(a)) for a in np.geomspace(4, top, n_alphas - 1)]
                    if n_alphas > 1 else [])
  betas = [0.0] + ([round(float(b), 4) for b in np.geomspace(1 / 64, 0.9, n_betas - 1)]
                   if n_betas > 1 else [])
  out = set()
  for a in alphas:
    for b in betas:
      r = Rule(a, b, n_sink)
      if r.span(min(lengths)) < 1 or all(r.is_dense(n) for n in lengths):
        continue
      out.add(r)
  if include_full:
    out.add(Rule.full())
  return sorted(out)
