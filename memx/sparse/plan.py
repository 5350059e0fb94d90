"""Sparse-attention plans: one length-elastic rule per attention head, as a versioned JSON file.

A plan is what `memx run --plan`, `memx eval --plan` and generation take: per layer, None
(the layer keeps its mask) or one (α, β, n_sink) rule per query head. `apply_plan` checks that
it was made for the model (layer count, heads, fingerprint) and writes it into
`ModelConfig.attn_plan`; every attention layer then builds its per-head mask at whatever
length it runs (`memx.kernels.attention.elastic_mask`), and decoding keeps a per-head cache of
each head's span (memx.nn.attention_decode).

Plans come from `search_plan` (MoA: minimise the profiled loss increase under a density budget
per length; memx.sparse.search solves the mixed-integer program) or from the baselines
`uniform_plan` (StreamingLLM: the same window + sinks in every head) and `longgen_plan`
(LongGen: a third of the layers dense, the rest window + sinks), all at the same budget.

File format (version 1):
  {"version": 1, "kind": "moa" | "uniform" | "longgen" | "dense", "fingerprint": "...",
   "n_layers": L, "n_heads": H, "kv_heads": G | null, "lengths": [...], "budget": [...] | null,
   "layers": [null | [[alpha, beta, n_sink], ... H], ... L],
   "predicted_density": {"N": fraction of causal pairs, averaged over attention heads},
   "predicted_kv_fraction": {"N": decode KV cache of the planned layers ÷ a dense one} | absent,
   "predicted_loss": float | null, "gap": float | null, "solver": "..." | null, "meta": {...}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from memx._io import atomic_file
from memx.errors import UserError
from memx.sparse.rules import Rule, candidate_rules, density, rules_mask
from memx.sparse.rules import kv_slots as rule_kv_slots

PLAN_VERSION = 1
KINDS = ("moa", "uniform", "longgen", "dense")

# Fields that do not change what a model computes, left out of its fingerprint.
_UNFINGERPRINTED = ("attn_plan", "attn_impl", "remat")


class PlanError(UserError):
  """A plan that is malformed, of another version, or made for another model."""


def model_fingerprint(model_cfg) -> str:
  """Stable hash of the model architecture (not its weights, not its plan)."""
  d = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in _UNFINGERPRINTED}
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_budget(name: str, budget) -> tuple[float, ...]:
  values = (budget,) if isinstance(budget, int | float) else tuple(budget)
  for b in values:
    if not (isinstance(b, int | float) and math.isfinite(b) and 0.0 < b <= 1.0):
      raise PlanError(f"{name} = {budget!r} is not allowed: a density budget is a fraction of "
                      "the causal attention pairs in (0, 1].")
  return tuple(float(b) for b in values)


@dataclasses.dataclass(frozen=True)
class Plan:
  kind: str
  fingerprint: str
  n_layers: int
  n_heads: int
  lengths: tuple[int, ...]
  layers: tuple[tuple[Rule, ...] | None, ...]
  budget: tuple[float, ...] | None = None
  predicted_loss: float | None = None
  gap: float | None = None
  solver: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  # The model's KV heads per layer (GQA), which the decode cache's size depends on; None in
  # plans written before memx recorded it (their KV fraction is then per query head).
  kv_heads: int | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise PlanError(f"plan kind {self.kind!r} is not one of {', '.join(KINDS)}.")
    if self.kv_heads is not None and not (
        isinstance(self.kv_heads, int) and not isinstance(self.kv_heads, bool)
        and self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0):
      raise PlanError(f"plan kv_heads = {self.kv_heads!r} must be a whole number >= 1 dividing "
                      f"its {self.n_heads} query heads.")
    if not all(n >= 1 for n in self.lengths):
      raise PlanError(f"plan lengths {list(self.lengths)} must be positive token counts.")
    if len(self.layers) != self.n_layers:
      raise PlanError(f"the plan lists {len(self.layers)} layers but says n_layers = "
                      f"{self.n_layers}.")
    for i, rules in enumerate(self.layers):
      if rules is not None and len(rules) != self.n_heads:
        raise PlanError(f"plan layer {i} has {len(rules)} rules; it needs one per head "
                        f"({self.n_heads}).")
    if self.budget is not None:
      _check_budget("plan budget", self.budget)

  # --- what it costs ------------------------------------------------------------------------

  def rules(self) -> list[Rule]:
    return [r for rules in self.layers if rules is not None for r in rules]

  def density(self, length: int) -> float:
    """Exact fraction of causal pairs visited at length N, averaged over planned heads."""
    rules = self.rules()
    return float(np.mean([density(r, length) for r in rules])) if rules else 1.0

  def kv_slots(self, length: int) -> int:
    """Key slots per sequence over the planned heads at length N (dense: N per head)."""
    return sum(rule_kv_slots(r, length) for r in self.rules())

  def kv_fraction(self, length: int) -> float:
    """The decode KV cache of the planned layers at length N as a fraction of a dense one.

    With `kv_heads` known, exactly what decoding allocates: each KV head keeps the most sinks
    and the widest span of the query heads sharing it (`attention_decode.ring_layout`), so
    memx eval's `kv_cache_bytes` equals this times the dense cache's bytes of those layers.
    Without it (old plans), the per-query-head slots, a lower bound under GQA.
    """
    planned = [rules for rules in self.layers if rules is not None]
    if not planned:
      return 1.0
    if self.kv_heads is None:
      return self.kv_slots(length) / (length * self.n_heads * len(planned))
    from memx.nn.attention_decode import ring_layout  # the cache's own sizing rule
    slots = sum(s + r for rules in planned for s, r in ring_layout(
        rules_mask(rules, length), self.n_heads, self.kv_heads, length))
    return slots / (length * self.kv_heads * len(planned))

  def attn_plan(self) -> tuple:
    """The `ModelConfig.attn_plan` value."""
    return tuple(None if rules is None else tuple(r.as_tuple() for r in rules)
                 for rules in self.layers)

  # --- files ----------------------------------------------------------------------------------

  def to_json(self) -> dict:
    return {"version": PLAN_VERSION, "kind": self.kind, "fingerprint": self.fingerprint,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "kv_heads": self.kv_heads,
            "lengths": list(self.lengths),
            "budget": None if self.budget is None else list(self.budget),
            "layers": [None if rules is None else [list(r.as_tuple()) for r in rules]
                       for rules in self.layers],
            "predicted_density": {str(n): self.density(n) for n in self.lengths},
            **({"predicted_kv_fraction": {str(n): self.kv_fraction(n) for n in self.lengths}}
               if self.kv_heads is not None else {}),
            "predicted_loss": self.predicted_loss, "gap": self.gap, "solver": self.solver,
            "meta": self.meta}

  @classmethod
  def from_json(cls, d: dict, where: str = "plan") -> Plan:
    if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
      v = d.get("version") if isinstance(d, dict) else None
      raise PlanError(f"{where} is a version {v} plan; this memx reads version "
                      f"{PLAN_VERSION} (search the plan again).")
    try:
      layers = tuple(None if rules is None else tuple(Rule(a, b, _integral(s, "n_sink"))
                                                       for a, b, s in rules)
                     for rules in d["layers"])
      return cls(kind=d["kind"], fingerprint=d["fingerprint"], n_layers=int(d["n_layers"]),
                 n_heads=int(d["n_heads"]), lengths=tuple(int(n) for n in d["lengths"]),
                 layers=layers, budget=None if d["budget"] is None else tuple(d["budget"]),
                 predicted_loss=d.get("predicted_loss"), gap=d.get("gap"),
                 solver=d.get("solver"), meta=d.get("meta", {}),
                 kv_heads=None if d.get("kv_heads") is None else _integral(d["kv_heads"],
                                                                           "kv_heads"))
    except (KeyError, TypeError, ValueError) as e:
      raise PlanError(f"{where} is not a valid memx plan: {e}") from e

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_file(path) as f:
      json.dump(self.to_json(), f, indent=1)
    return path

  @classmethod
  def load(cls, path: str | pathlib.Path) -> Plan:
    path = pathlib.Path(path)
    if path.is_dir():
      raise PlanError(f"plan {path} is a directory; give a plan file (JSON, written by "
                      "`memx sparse search` or `memx sparse baseline`).")
    if not path.is_file():
      raise PlanError(f"plan {path} does not exist; write one with `memx sparse search`.")
    try:
      d = json.loads(path.read_text())
    except ValueError as e:
      raise PlanError(f"plan {path} is not JSON: {e}") from e
    return cls.from_json(d, where=f"plan {path}")


# --- applying ----------------------------------------------------------------------------------

def check_plan(plan: Plan, model_cfg) -> None:
  """Raises PlanError unless `plan` was made for a model of this architecture."""
  if plan.n_layers != model_cfg.n_layers or plan.n_heads != model_cfg.n_heads:
    raise PlanError(f"the plan is for {plan.n_layers} layers × {plan.n_heads} heads; this model "
                    f"has {model_cfg.n_layers} layers × {model_cfg.n_heads} heads.")
  bad = [i for i, rules in enumerate(plan.layers)
         if rules is not None and model_cfg.mixer(i) != "attention"]
  if bad:
    raise PlanError(f"the plan gives rules to layers {bad}, which are not attention layers here.")
  if plan.fingerprint != model_fingerprint(model_cfg):
    raise PlanError(f"the plan was made for another model (fingerprint {plan.fingerprint}, this "
                    f"model's is {model_fingerprint(model_cfg)}): same layer and head counts but "
                    "a different architecture. Profile and search this model.")


def apply_plan(cfg, plan: Plan):
  """A copy of `cfg` (a Config or a ModelConfig) whose model follows `plan`."""
  model_cfg = getattr(cfg, "model", cfg)
  check_plan(plan, model_cfg)
  if model_cfg.attn_window is not None:
    raise PlanError(f"the model has model.attn_window = {model_cfg.attn_window}; a plan replaces "
                    "the window, so apply it to the dense model.")
  new_model = dataclasses.replace(model_cfg, attn_plan=plan.attn_plan())
  return new_model if cfg is model_cfg else dataclasses.replace(cfg, model=new_model)


# --- building plans ----------------------------------------------------------------------------

def _attention_layers(model_cfg) -> list[int]:
  return [i for i in range(model_cfg.n_layers) if model_cfg.mixer(i) == "attention"]


def _needs_attention(model_cfg, kind: str) -> None:
  if not _attention_layers(model_cfg):
    raise PlanError(f"a {kind} plan sparsifies attention, and this model has no attention "
                    f"layer (mixers {list(model_cfg.mixers)}): its budget could not apply.")


def dense_plan(model_cfg, lengths: Sequence[int]) -> Plan:
  layers = tuple((Rule.full(),) * model_cfg.n_heads if model_cfg.mixer(i) == "attention"
                 else None for i in range(model_cfg.n_layers))
  return Plan(kind="dense", fingerprint=model_fingerprint(model_cfg), n_layers=model_cfg.n_layers,
              n_heads=model_cfg.n_heads, lengths=tuple(lengths), layers=layers,
              kv_heads=model_cfg.kv_heads)


def _uniform_beta(budget: tuple[float, ...], lengths, n_sink: int) -> float:
  """Largest β (with α = 0) whose density is within the budget at every length."""
  def ok(beta):
    return all(density(Rule(0.0, beta, n_sink), n) <= b
               for n, b in zip(lengths, budget, strict=True))
  if not ok(0.0):
    over = [(density(Rule(0.0, 0.0, n_sink), n) - b, n, b)
            for n, b in zip(lengths, budget, strict=True)]
    excess, n, b = max(over)
    raise PlanError(f"density budget {b:g} at length {n} is infeasible for a uniform window "
                    f"with {n_sink} sinks: the narrowest window already needs {b + excess:.4f} "
                    "there.")
  lo, hi = 0.0, 1.0
  if ok(hi):
    return hi
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


def _integral(x, what: str) -> int:
  if isinstance(x, bool) or not float(x).is_integer():
    raise ValueError(f"{what} = {x!r} is not a whole number")
  return int(x)


def _budgets(budget, lengths, name: str = "budget") -> tuple[float, ...]:
  b = _check_budget(name, budget)
  if len(b) == 1:
    b = b * len(lengths)
  if len(b) != len(lengths):
    raise PlanError(f"give one {name} or one per length: {len(b)} values for lengths "
                    f"{list(lengths)}.")
  return b


def _ascending(lengths, *per_length):
  """(sorted lengths, each per-length tuple reordered with them): values given for lengths in
  any order stay attached to their own length."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  return (tuple(lengths[i] for i in order),
          *(None if v is None else tuple(v[i] for i in order) for v in per_length))


def uniform_plan(model_cfg, budget, lengths: Sequence[int], *, n_sink: int = 4) -> Plan:
  """StreamingLLM-style baseline: every head keeps the same span β·N plus n_sink sinks, the
  widest that fits the budget at every length (so it scales with N like the MoA rules)."""
  _needs_attention(model_cfg, "uniform")
  lengths, b = _ascending(tuple(lengths), _budgets(budget, lengths))
  rule = Rule(0.0, _uniform_beta(b, lengths, n_sink), n_sink)
  layers = tuple((rule,) * model_cfg.n_heads if model_cfg.mixer(i) == "attention" else None
                 for i in range(model_cfg.n_layers))
  return Plan(kind="uniform", fingerprint=model_fingerprint(model_cfg),
              n_layers=model_cfg.n_layers, n_heads=model_cfg.n_heads, lengths=lengths,
              layers=layers, budget=b, kv_heads=model_cfg.kv_heads)


def longgen_plan(model_cfg, budget, lengths: Sequence[int], *, n_sink: int = 4,
                 dense_fraction: float = 1 / 3) -> Plan:
  """LongGen-style baseline: round(dense_fraction · attention layers) layers, evenly spread and
  centred, keep full attention; the others share one window + sinks sized to the budget."""
  _needs_attention(model_cfg, "LongGen")
  lengths, b = _ascending(tuple(lengths), _budgets(budget, lengths))
  attn = _attention_layers(model_cfg)
  n_dense = max(1, round(dense_fraction * len(attn)))
  stride = len(attn) / n_dense
  dense_layers = {attn[int(stride * k + stride / 2)] for k in range(n_dense)}
  n_sparse = len(attn) - n_dense
  if n_sparse == 0:
    raise PlanError(f"LongGen with dense_fraction {dense_fraction:.2f} leaves no sparse layer "
                    f"in a model with {len(attn)} attention layers.")
  # Average density = (n_dense · 1 + n_sparse · d_sparse) / len(attn) <= budget.
  sparse_budget = tuple((bb * len(attn) - n_dense) / n_sparse for bb in b)
  if min(sparse_budget) <= 0:
    need = n_dense / len(attn)
    raise PlanError(f"density budget {min(b):.3f} is infeasible for the LongGen baseline: its "
                    f"{n_dense} dense layer(s) of {len(attn)} alone use {need:.3f}; give a "
                    f"budget above {need:.3f} or a smaller dense_fraction.")
  rule = Rule(0.0, _uniform_beta(sparse_budget, lengths, n_sink), n_sink)
  layers = tuple(None if model_cfg.mixer(i) != "attention"
                 else (Rule.full(),) * model_cfg.n_heads if i in dense_layers
                 else (rule,) * model_cfg.n_heads for i in range(model_cfg.n_layers))
  return Plan(kind="longgen", fingerprint=model_fingerprint(model_cfg),
              n_layers=model_cfg.n_layers, n_heads=model_cfg.n_heads, lengths=lengths,
              layers=layers, budget=b, meta={"dense_layers": sorted(dense_layers)},
              kv_heads=model_cfg.kv_heads)


def search_plan(profile, budget, *, lengths: Sequence[int] | None = None,
                rules: Sequence[Rule] | None = None, layer_budget: float | None = None,
                n_sink: int = 4, include_full: bool = True, method: str = "auto",
                time_limit: float = 60.0, kv_budget: float | Sequence[float] | None = None,
                kv_heads: int | None = None,
                length_weights: Sequence[float] | None = None,
                head_scale: Sequence[float] | None = None) -> Plan:
  """MoA: the rule per head minimising the profiled loss increase under the budget.

  lengths: the profiled lengths to optimise over (default all the profile has); budget: one
  density budget or one per length; layer_budget: optional cap on each layer's average.
  kv_budget: optional cap on the decode KV cache as a fraction of a dense one (one value or one
  per length). Under GQA a KV head's ring holds the widest span of the query heads sharing it,
  so KV memory is a max per group, which the MILP models exactly (`search` module docstring);
  each group is costed as max sinks + max span, as `attention_decode.ring_layout` sizes it (an
  upper bound where its ring would exceed N − sinks: `Plan.kv_fraction` is the exact value).
  The fraction covers the profiled (planned) layers; other attention layers keep dense caches.
  kv_heads: the model's KV heads per layer; taken from the profile, which records it (profiles
  written before it did need it given, and a given value must equal the profile's).
  length_weights: one weight >= 0 per length on its predicted loss increase in the objective
  (default 1 each); MoA's Pareto front over lengths is the set of plans over such weightings
  (`memx.sparse.validate`). A length with weight 0 still has its budget.
  head_scale: one factor >= 1 per profiled head (row order of `Profile.costs`) multiplying its
  predicted costs: a measured correction of the first-order profile
  (`memx.sparse.validate.measured_head_scale`).
  """
  from memx.sparse import search

  given = tuple(lengths or profile.lengths)
  profile.require_lengths(given)
  b = _budgets(budget, given)
  if layer_budget is not None:
    _check_budget("layer_budget", layer_budget)
  kv = {}
  if profile.kv_heads is not None:
    if kv_heads is not None and kv_heads != profile.kv_heads:
      raise PlanError(f"kv_heads = {kv_heads!r}, but the profiled model has "
                      f"{profile.kv_heads} KV heads per layer: leave kv_heads out.")
    kv_heads = profile.kv_heads
  if kv_heads is not None and not (isinstance(kv_heads, int) and kv_heads >= 1
                                   and profile.n_heads % kv_heads == 0):
    raise PlanError(f"kv_heads = {kv_heads!r} must be the model's KV heads per layer, a whole "
                    f"number dividing its {profile.n_heads} query heads.")
  kb = None
  if kv_budget is not None:
    kb = _budgets(kv_budget, given, "kv_budget")
    if kv_heads is None:
      raise PlanError("kv_budget needs the model's KV heads per layer, which this profile "
                      "predates recording: give kv_heads (--kv-heads), or profile again.")
  lengths, b, kb, weights = _ascending(given, b, kb, _length_weights(length_weights, given))
  cands = list(rules) if rules is not None else candidate_rules(
      lengths, n_sink=n_sink, include_full=include_full)
  cost = profile.costs(cands, lengths, weights)
  if head_scale is not None:
    scale = np.asarray(head_scale, np.float64)
    if scale.shape != (cost.shape[0],) or not np.all(np.isfinite(scale)) or np.any(scale < 1):
      raise PlanError(f"head_scale must hold one finite factor >= 1 per profiled head "
                      f"({cost.shape[0]}); got shape {scale.shape}.")
    cost = cost * scale[:, None]
  dens = np.array([[density(r, n) for n in lengths] for r in cands])      # [R, n_lengths]
  dens = np.broadcast_to(dens[None], (cost.shape[0], *dens.shape))
  layer_of = np.repeat(np.arange(len(profile.layers)), profile.n_heads)
  if kv_budget is not None:
    parts = np.array([[(min(r.n_sink, n) / n, r.span(n) / n) for n in lengths] for r in cands])
    kv_of_head = np.arange(profile.n_heads) // (profile.n_heads // kv_heads)
    kv = {"kv_budget": kb,
          "kv_slots": np.broadcast_to(parts[None], (cost.shape[0], *parts.shape)),
          "kv_group": layer_of * kv_heads + np.tile(kv_of_head, len(profile.layers))}
  sol = search.solve(cost, dens, b, layer_of=layer_of, layer_budget=layer_budget,
                     method=method, time_limit=time_limit, lengths=lengths, **kv)
  layers: list = [None] * profile.n_layers
  for li, layer in enumerate(profile.layers):
    layers[layer] = tuple(cands[sol.choice[li * profile.n_heads + h]]
                          for h in range(profile.n_heads))
  # predicted_loss is the profile's unweighted, unscaled sum over lengths whatever the weights
  # and scales (the objective itself without them), so plans of one profile compare on it.
  plan = Plan(kind="moa", fingerprint=profile.fingerprint, n_layers=profile.n_layers,
              n_heads=profile.n_heads, lengths=lengths, layers=tuple(layers), budget=b,
              predicted_loss=float(sol.objective), gap=float(sol.gap),
              solver=f"{sol.method}: {sol.status}",
              meta={"candidates": len(cands), "layer_budget": layer_budget,
                    "length_weights": list(weights),
                    "head_scale": None if head_scale is None else [float(x) for x in head_scale],
                    "kv_budget": kv.get("kv_budget"), "profile": profile.meta},
              kv_heads=kv_heads)
  if any(w != 1.0 for w in weights) or head_scale is not None:
    plan = dataclasses.replace(plan, predicted_loss=predicted_loss(profile, plan, lengths))
  return plan


def _length_weights(weights, lengths) -> tuple[float, ...]:
  if weights is None:
    return (1.0,) * len(lengths)
  w = tuple(float(x) for x in weights)
  if len(w) != len(lengths) or not all(math.isfinite(x) and x >= 0 for x in w) or not any(w):
    raise PlanError(f"length_weights {list(weights)} must be one finite weight >= 0 per length "
                    f"{list(lengths)}, not all 0.")
  return w


def predicted_loss(profile, plan: Plan, lengths: Sequence[int] | None = None) -> float:
  """The profile's predicted loss increase of any plan (e.g. a baseline), summed over lengths."""
  lengths = tuple(lengths or profile.lengths)
  total = 0.0
  for li, layer in enumerate(profile.layers):
    rules = plan.layers[layer]
    if rules is None:
      continue
    for n in lengths:
      profile.require_lengths([n])
      removed = profile.removed_fraction(list(rules), n)             # [H, nb, nb]
      total += float(np.einsum("hij,hij->", profile.influence[n][li], removed))
  return total
