"""MoA's last step: search several plans, measure each one's loss, keep the best.

The profile predicts a plan's loss increase to first order, without rerunning the model. That is
accurate for small cuts and can be far off for large ones (a head whose attention is saturated
on one key has a tiny gradient there, so removing that key looks cheap). MoA therefore does not
trust a single solution: it solves the program with one objective per profiled length for its
Pareto front, then runs the model under each plan of the front at a length it never profiled
and keeps the plan with the least measured loss (Fu et al. 2024; the authors validate at 12k
after profiling up to 8k). memx does the same:

- `pareto_plans`: `search_plan` under each weighting of the per-length objectives on a simplex
  lattice (`points` weightings per pair of lengths; the equal weighting, plain `search_plan`,
  is always one of them); every plan meets the same budgets. Duplicates are dropped.
- `validation_losses`: the model's training loss under each plan on calibration rows at the
  validation length: rows the profile did not see (another seed), of the calibration source the
  profile recorded. Each plan compiles one forward.
- `validate`: both, and the plan with the least measured loss, which records the validation
  (length, every candidate's weights, predicted and measured loss) in `meta["validation"]`.

A language-modelling guard (memx's, not MoA's). The calibration loss of long-range rows is the
loss of their answers, so the least of it can buy a few answer tokens with a large loss on
ordinary text: on the MoA experiment's 16-head model at 25% density, where no plan retrieves,
validation kept a plan that cost 0.56 nats more corpus loss than the single search. Given
`guard_data` (the run's LM source without its task: `guard_source`) and `guard_tolerance`
(nats), `validate` also measures every candidate's loss on those rows and keeps the least
calibration loss among the candidates within the tolerance of the dense model's guard loss;
when none is, the least guard loss, with a warning.

A measured correction (memx's, not MoA's). Where the first-order profile underprices a head, no
weighting helps: every candidate cuts it. `measured_head_scale` runs the model once per head
with that head alone cut to a short window (`cut`, default 16 tokens + 4 sinks) and compares the
measured loss increase with the profile's prediction for the same cut; the ratio (at least 1)
multiplies that head's costs in the search. Given `head_scale`, `validate` adds the Pareto plans
of the corrected costs to the candidates, and the measured loss still decides. On the MoA
experiment's 32-head model two saturated retrieval heads measured 130× and 253× their
prediction (every other head at most 4.3×), and the corrected search at 25% density kept them
wide and retrieved, where every uncorrected candidate retrieved nothing
(benchmarks/RESULTS.md, "MoA experiment").
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memx.errors import UserError
from memx.sparse.plan import Plan, check_plan, search_plan
from memx.sparse.rules import Rule, rules_mask

log = logging.getLogger(__name__)
VALIDATION_SEED = 4321  # profile_model's default is 1234: validation rows are others
CUT = Rule(16, 0.0, 4)  # measured_head_scale's cut: a 16-token window + 4 sinks


def simplex_weights(n_lengths: int, points: int) -> list[tuple[float, ...]]:
  """Weightings of n_lengths objectives on the simplex lattice with `points` - 1 steps per edge
  (each weight a multiple of 1/(points - 1), summing to 1), the equal weighting first."""
  if n_lengths < 1 or points < 1:
    raise UserError(f"simplex_weights: n_lengths = {n_lengths}, points = {points} must be >= 1.")
  equal = (1.0 / n_lengths,) * n_lengths
  if n_lengths == 1 or points == 1:
    return [equal]
  steps = points - 1
  out = [equal]
  for cut in itertools.combinations(range(steps + n_lengths - 1), n_lengths - 1):
    parts = np.diff([-1, *cut, steps + n_lengths - 1]) - 1  # stars and bars
    w = tuple(float(p) / steps for p in parts)
    if not np.allclose(w, equal):
      out.append(w)
  return out


def pareto_plans(profile, budget, *, points: int = 5, **search_kw) -> list[Plan]:
  """Distinct `search_plan` solutions over the weightings of `simplex_weights` (module doc)."""
  lengths = tuple(sorted(search_kw.pop("lengths", None) or profile.lengths))
  plans, seen = [], set()
  for i, w in enumerate(simplex_weights(len(lengths), points)):
    # The equal weighting is the plain search (weights 1 each).
    plan = search_plan(profile, budget, lengths=lengths, length_weights=None if i == 0 else w,
                       **search_kw)
    key = plan.attn_plan()
    if key not in seen:
      seen.add(key)
      plans.append(plan)
  return plans


def _rows(data_cfg, length: int, batches: int, batch_size: int, seed: int):
  """(data config at `length`, its loader): bad sizes or a length the data cannot fill raise
  here, before any compute."""
  from memx.data import make_loader

  if batches < 1 or batch_size < 1:
    raise UserError(f"validation batches = {batches}, batch_size = {batch_size} must be >= 1.")
  cfg = dataclasses.replace(data_cfg, seq_len=int(length), passkey_min_len=None)
  return cfg, make_loader(cfg, batch_size=batch_size, seed=seed, split="train")


def validation_losses(model, plans: Sequence[Plan | None], data_cfg, length: int, *,
                      batches: int = 4, batch_size: int = 4,
                      seed: int = VALIDATION_SEED) -> list[dict]:
  """Per plan (None = the dense model): {"loss", "exact_match"} over the same calibration rows
  of `data_cfg` at `length` (training split, `seed`). exact_match is None without a task."""
  from memx.sparse.evaluate import _forward, _run, with_plan

  cfg, _ = _rows(data_cfg, length, batches, batch_size, seed)
  for p in plans:
    if p is not None:
      check_plan(p, model.cfg)
  out = []
  for p in plans:
    loss, exact, _ = _run(_forward(with_plan(model, p)), cfg, batches, batch_size, seed, "train")
    out.append({"loss": float(loss), "exact_match": None if exact is None else float(exact)})
  return out


def measured_head_scale(model, profile, data_cfg, length: int, *, cut: Rule = CUT,
                        batches: int = 2, batch_size: int = 4,
                        seed: int = VALIDATION_SEED) -> np.ndarray:
  """float [len(profile.layers) · n_heads] (the rows of `Profile.costs`): per head,
  max(1, measured / predicted loss increase) of cutting that head alone to `cut` at `length`
  (a profiled length), measured on `data_cfg`'s rows (training split, `seed`)."""
  from memx.sparse.plan import model_fingerprint
  from memx.train.loss import token_losses

  profile.require_lengths([length])
  if model_fingerprint(model.cfg) != profile.fingerprint:
    raise UserError("measured_head_scale: the model is not the one profiled (fingerprints differ).")
  _, loader = _rows(data_cfg, length, batches, batch_size, seed)
  rows = [{k: jnp.asarray(v) for k, v in loader.local_batch(k).items()} for k in range(batches)]
  graphdef, params = nnx.split(model)
  n_heads = profile.n_heads
  shape = (batch_size, n_heads, length, length)
  zeros = jnp.zeros(shape, jnp.float32)  # every profiled layer takes the bias path, cut or not
  keep = np.asarray(rules_mask([cut], length).dense(length, length, head=0))
  cut_bias = np.where(keep.reshape(length, length), 0.0, -1e9).astype(np.float32)

  @jax.jit
  def loss(batch, biases):  # mean over the batch's weighted tokens, as the profile's loss
    logits = nnx.merge(graphdef, params)(batch["inputs"], score_biases=biases)
    return jnp.sum(token_losses(logits, batch["targets"]) * batch["weights"]) / jnp.sum(
        batch["weights"])

  def mean_loss(cut_layer: int | None, head: int) -> float:
    biases = dict.fromkeys(profile.layers, zeros)
    if cut_layer is not None:
      head_bias = np.zeros((n_heads, length, length), np.float32)
      head_bias[head] = cut_bias
      biases[cut_layer] = jnp.broadcast_to(jnp.asarray(head_bias), shape)
    return sum(float(loss(b, biases)) for b in rows) / len(rows)

  base = mean_loss(None, 0)
  removed = profile.removed_fraction([cut], length)[0]
  scale = np.ones(len(profile.layers) * n_heads)
  for li, layer in enumerate(profile.layers):
    for h in range(n_heads):
      predicted = float((profile.influence[length][li, h] * removed).sum())
      measured = mean_loss(layer, h) - base
      scale[li * n_heads + h] = max(1.0, measured / max(predicted, 1e-12))
  return scale


def guard_source(data_cfg):
  """The data config of `data_cfg`'s language-modelling rows alone (its task dropped): what
  `validate`'s guard measures."""
  from memx.data.config import LM_SOURCES

  if data_cfg.source not in LM_SOURCES:
    raise UserError(f"the LM-loss guard needs a language-modelling source ({', '.join(LM_SOURCES)})"
                    f"; this run's data.source is {data_cfg.source!r}.")
  if data_cfg.document_mask:
    from memx.sparse.profile import one_document_error
    raise UserError(one_document_error("the LM-loss guard", has_task=data_cfg.task is not None))
  return dataclasses.replace(data_cfg, task=None, task_fraction=0.0, passkey_min_len=None)


def choose(records: Sequence[dict], tolerance: float | None = None,
           dense_guard: float | None = None) -> tuple[int, bool]:
  """(index of the kept candidate, whether the guard was met): the least "loss", among the
  records whose "guard_loss" is within `tolerance` of `dense_guard` when a tolerance is given;
  if none is, the least "guard_loss" (met = False)."""
  losses = np.array([r["loss"] for r in records])
  if tolerance is None:
    return int(np.argmin(losses)), True
  guard = np.array([r["guard_loss"] for r in records])
  within = guard - dense_guard <= tolerance
  if not within.any():
    return int(np.argmin(guard)), False
  return int(np.argmin(np.where(within, losses, np.inf))), True


def validate(model, profile, budget, data_cfg, length: int, *, points: int = 5,
             batches: int = 4, batch_size: int = 4, seed: int = VALIDATION_SEED,
             head_scale=None, guard_data=None, guard_tolerance: float | None = None,
             **search_kw) -> tuple[Plan, list[dict]]:
  """The Pareto plans of `profile` at `budget` (and, given `head_scale`, those of the corrected
  costs), measured at `length` on `data_cfg`'s rows; returns (the kept plan, one record per
  candidate: weights, whether corrected, predicted and measured loss, and with a guard its
  guard loss). Kept: the least measured loss, within `guard_tolerance` nats of the dense
  model's loss on `guard_data` when given (module doc)."""
  _rows(data_cfg, length, batches, batch_size, seed)  # bad input: before any search
  if (guard_data is None) != (guard_tolerance is None):
    raise UserError("validate: give both guard_data and guard_tolerance, or neither.")
  if guard_data is not None:
    if not np.isfinite(guard_tolerance) or guard_tolerance < 0:
      raise UserError(f"validate: guard_tolerance = {guard_tolerance} must be a finite number "
                      "of nats >= 0.")
    _rows(guard_data, length, batches, batch_size, seed)
  longest = max(search_kw.get("lengths") or profile.lengths)
  if length < longest:
    log.warning("validating at N = %d, below the longest profiled length %d: a plan that fails "
                "only at longer lengths looks as good as one that does not (MoA validates "
                "longer than it profiles).", length, longest)
  candidates = pareto_plans(profile, budget, points=points, **search_kw)
  if head_scale is not None:
    seen = {p.attn_plan() for p in candidates}
    candidates += [p for p in pareto_plans(profile, budget, points=points,
                                           head_scale=head_scale, **search_kw)
                   if p.attn_plan() not in seen]
  measured = validation_losses(model, candidates, data_cfg, length, batches=batches,
                               batch_size=batch_size, seed=seed)
  records = [{"length_weights": p.meta["length_weights"],
              "corrected": p.meta.get("head_scale") is not None,
              "predicted_loss": p.predicted_loss, **m}
             for p, m in zip(candidates, measured, strict=True)]
  validation = {"length": int(length), "batches": batches, "batch_size": batch_size,
                "seed": seed, "calibration": data_cfg.source}
  dense_guard = None
  if guard_data is not None:
    dense, *guarded = validation_losses(model, [None, *candidates], guard_data, length,
                                        batches=batches, batch_size=batch_size, seed=seed)
    dense_guard = dense["loss"]
    for r, g in zip(records, guarded, strict=True):
      r["guard_loss"] = g["loss"]
  best, met = choose(records, guard_tolerance, dense_guard)
  if guard_data is not None:
    validation["guard"] = {"source": guard_data.source, "tolerance": float(guard_tolerance),
                           "dense_loss": dense_guard, "met": met}
    if not met:
      log.warning("no candidate is within %.3g nats of the dense model's %s loss %.4f: kept the "
                  "least guard loss, %.4f.", guard_tolerance, guard_data.source, dense_guard,
                  records[best]["guard_loss"])
  chosen = candidates[best]
  meta = {**chosen.meta, "validation": {**validation, "chosen": best, "candidates": records}}
  return dataclasses.replace(chosen, meta=meta), records
