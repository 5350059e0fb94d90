"""`memx sparse profile|search|baseline|show` and `memx eval`: the MoA pipeline on the CLI.

  memx sparse profile RUN --lengths 256,512,1024 --out RUN/sparse/profile.npz
  memx sparse search PROFILE --budget 0.25 --out plan.json [--layer-budget 0.5] [--method milp]
      [--validate RUN --validate-length 2048]   (MoA: Pareto plans, the least measured loss)
      [--measure-heads] [--guard-tolerance 0.1]  (memx: measured head costs; an LM-loss guard)
  memx sparse baseline RUN --kind uniform|longgen|dense --budget 0.25 --lengths ... --out F
  memx sparse show PLAN                    (rules per layer, densities, KV slots)
  memx eval RUN [--plan PLAN] [--name NAME] --lengths 256,512,1024 [--depths 0.1,0.5,0.9]
  memx run EXPERIMENT --plan PLAN          (train or fine-tune with the plan's masks)

Every step is also a Python call (memx.sparse.profile.profile_model, plan.search_plan,
validate.validate, plan.uniform_plan / longgen_plan, evaluate.evaluate). Inputs are checked
before any compute; every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import pathlib

from memx.errors import UserError


def _ints(text: str, what: str) -> list[int]:
  try:
    out = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UserError(f"{what} = {text!r} must be a comma-separated list of integers.") from None
  if not out or min(out) < 2:
    raise UserError(f"{what} = {text!r} must list integers >= 2.")
  return out


def _floats(text: str, what: str) -> list[float]:
  try:
    out = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UserError(f"{what} = {text!r} must be a comma-separated list of numbers.") from None
  if not out:
    raise UserError(f"{what} is empty.")
  return out


def add_parser(sub) -> None:
  sp = sub.add_parser("sparse", help="MoA sparse-attention plans: profile, search, baselines")
  ssub = sp.add_subparsers(dest="sparse_command", required=True)

  p = ssub.add_parser("profile", help="profile a trained dense run's attention influence")
  p.add_argument("run", help="run directory (or its checkpoints/)")
  p.add_argument("--lengths", required=True, help="comma-separated sequence lengths")
  p.add_argument("--out", required=True, help="profile file to write (.npz)")
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--batch-size", type=int, default=2)
  p.add_argument("--block", type=int, default=32, help="tile size of the influence pooling")
  p.add_argument("--calibration", default="auto", choices=["auto", "task", "train"],
                 help="calibration rows: 'task' = the run's synthetic task alone (long-range "
                      "data, as MoA calibrates: its loss is the answers), 'train' = the training "
                      "mix (corpus rows then dominate the loss), 'auto' = task if the run has "
                      "one, else train")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  p.set_defaults(handler=_profile)

  s = ssub.add_parser("search", help="pick one rule per head under a density budget")
  s.add_argument("profile")
  s.add_argument("--budget", required=True,
                 help="fraction of causal pairs kept, one value or one per length")
  s.add_argument("--lengths", default=None, help="profiled lengths to use (default all)")
  s.add_argument("--layer-budget", type=float, default=None)
  s.add_argument("--kv-budget", default=None,
                 help="cap on the decode KV cache as a fraction of a dense one (one value or "
                      "one per length)")
  s.add_argument("--kv-heads", type=int, default=None,
                 help="the model's KV heads per layer (default: the profile's; only profiles "
                      "written before memx recorded it need this)")
  s.add_argument("--n-sink", type=int, default=4)
  s.add_argument("--no-full", action="store_true", help="exclude full attention as a rule")
  s.add_argument("--method", default="auto", choices=["auto", "milp", "greedy"])
  s.add_argument("--time-limit", type=float, default=60.0)
  s.add_argument("--validate", default=None, metavar="RUN",
                 help="MoA's validation: search the Pareto front over the per-length objectives "
                      "and keep the plan with the least loss of RUN's model measured at "
                      "--validate-length on calibration rows the profile did not see")
  s.add_argument("--validate-length", type=int, default=None,
                 help="length to validate at (MoA: one the profile never saw; default the "
                      "longest profiled length)")
  s.add_argument("--pareto-points", type=int, default=5,
                 help="weightings per pair of lengths on the Pareto front")
  s.add_argument("--measure-heads", action="store_true",
                 help="with --validate: also search with each head's costs scaled by its "
                      "measured / predicted loss increase when cut alone (one forward per head; "
                      "memx.sparse.validate.measured_head_scale)")
  s.add_argument("--guard-tolerance", type=float, default=None, metavar="NATS",
                 help="with --validate: keep only plans whose loss on RUN's language-modelling "
                      "rows (its task dropped) is within NATS of the dense model's, when any "
                      "is (memx.sparse.validate.choose)")
  s.add_argument("--validate-batches", type=int, default=4)
  s.add_argument("--validate-batch-size", type=int, default=4)
  s.add_argument("--out", required=True)
  s.set_defaults(handler=_search)

  b = ssub.add_parser("baseline", help="uniform-window / LongGen / dense plans at a budget")
  b.add_argument("run")
  b.add_argument("--kind", required=True, choices=["uniform", "longgen", "dense"])
  b.add_argument("--budget", default="1.0")
  b.add_argument("--lengths", required=True)
  b.add_argument("--n-sink", type=int, default=4)
  b.add_argument("--out", required=True)
  b.set_defaults(handler=_baseline)

  sh = ssub.add_parser("show", help="print a plan's rules and densities")
  sh.add_argument("plan")
  sh.set_defaults(handler=_show)

  e = sub.add_parser("eval", help="evaluate a trained run (optionally under a sparse plan)")
  e.add_argument("run")
  e.add_argument("--plan", default=None)
  e.add_argument("--name", default=None, help="evaluation name (default: plan kind or dense)")
  e.add_argument("--lengths", required=True)
  e.add_argument("--depths", default="0.1,0.5,0.9", help="passkey needle depths")
  e.add_argument("--batches", type=int, default=2)
  e.add_argument("--batch-size", type=int, default=8)
  e.add_argument("--step", type=int, default=None)
  e.add_argument("--kv-quant", default=None, metavar="BITS[:GROUP[:RESIDUAL]]",
                 help="decode from a KIVI-quantized KV cache (2, 4 or 8 bits; keys grouped "
                      "over GROUP tokens, default 32; RESIDUAL more recent tokens kept at full "
                      "precision, default 0): every row runs through the decode path")
  e.add_argument("--kv-evict", default=None, metavar="HEAVY:RECENT[:OBSERVE[:POOL]]",
                 help="decode from H2O caches keeping HEAVY heavy-hitter and RECENT recent "
                      "tokens per KV head in the causal attention layers (OBSERVE: score the "
                      "prompt by its last OBSERVE queries; POOL: rank by the best score within "
                      "POOL positions, SnapKV): every row runs through the decode path")
  e.add_argument("--weight-quant", default=None,
                 metavar="gptq:BITS:GROUP[:CALIB]|rtn:BITS:GROUP|nf4",
                 help="quantize the attention and SwiGLU projections first (memx.quant): GPTQ "
                      "on CALIB (default 8) batches of the run's training data, round-to-"
                      "nearest, or QLoRA's NF4; BITS 2, 3, 4 or 8, GROUP input rows per scale")
  e.set_defaults(handler=_eval)


def _quantize(trained, weight_quant, batch_size: int) -> dict:
  """Quantizes the trained model's projections in place (GPTQ calibrates on the first batches
  of the run's training data; a LoRA run's adapters are merged into their bases first); the
  statistics for the evaluation's JSON."""
  from memx.data import make_loader
  from memx.nn.lora import merge_lora
  from memx.quant.model import check, quantize_model

  merge_lora(trained.model)
  try:
    check(trained.model, weight_quant)
  except ValueError as e:
    raise UserError(f"--weight-quant {weight_quant.name}: {e}") from None
  calib = None
  if weight_quant.method == "gptq":
    loader = make_loader(trained.cfg.data, batch_size=batch_size, seed=trained.cfg.train.seed,
                         split="train")
    calib = [loader.local_batch(i) for i in range(weight_quant.calib_batches)]
  return quantize_model(trained.model, weight_quant, calib)


def _budget_arg(text: str) -> float | list[float]:
  values = _floats(text, "--budget")
  return values[0] if len(values) == 1 else values


def _check_out(path: str) -> None:
  """Before any compute: an --out that cannot be written would fail only at the end."""
  if pathlib.Path(path).is_dir():
    raise UserError(f"--out {path} is a directory; give the file to write.")


def _check_n_sink(args) -> None:
  if args.n_sink < 0:
    raise UserError(f"--n-sink {args.n_sink} is not allowed: sinks are a count of initial "
                    "tokens, >= 0.")


def _profile(args) -> int:
  from memx.sparse.profile import ProfileError, calibration_data, profile_model
  from memx.train.restore import load_trained

  _check_out(args.out)
  lengths = _ints(args.lengths, "--lengths")
  if args.batches < 1 or args.batch_size < 1 or args.block < 1:
    raise ProfileError("--batches, --batch-size and --block must be positive.")
  trained = load_trained(args.run, step=args.step)
  data = calibration_data(trained.cfg.data, args.calibration)
  prof = profile_model(trained.model, data, lengths, batches=args.batches,
                       batch_size=args.batch_size, block=args.block,
                       meta={"run": str(trained.run_dir), "step": trained.step,
                             "calibration": data.source})
  out = prof.save(args.out)
  print(f"profile of {trained.run_dir} (step {trained.step}) at lengths {prof.lengths}: {out}")
  return 0


def _search(args) -> int:
  from memx.sparse.plan import search_plan
  from memx.sparse.profile import Profile

  _check_out(args.out)
  _check_n_sink(args)
  prof = Profile.load(args.profile)
  lengths = _ints(args.lengths, "--lengths") if args.lengths else None
  search_kw = dict(lengths=lengths, layer_budget=args.layer_budget, n_sink=args.n_sink,
                   include_full=not args.no_full, method=args.method,
                   time_limit=args.time_limit,
                   kv_budget=None if args.kv_budget is None else _budget_arg(args.kv_budget),
                   kv_heads=args.kv_heads)
  if args.validate is None:
    if args.measure_heads or args.guard_tolerance is not None:
      raise UserError("--measure-heads and --guard-tolerance need --validate RUN (the model to "
                      "measure).")
    plan = search_plan(prof, _budget_arg(args.budget), **search_kw)
  else:
    plan = _validated(args, prof, search_kw)
  out = plan.save(args.out)
  print(_describe(plan))
  print(f"plan: {out}")
  return 0


def _validated(args, prof, search_kw):
  from memx.sparse.plan import PlanError, model_fingerprint, search_plan
  from memx.sparse.profile import calibration_data
  from memx.sparse.validate import guard_source, measured_head_scale, validate
  from memx.train.restore import load_config, load_trained

  length = args.validate_length or max(search_kw["lengths"] or prof.lengths)
  if length < 2 or args.pareto_points < 1 or args.validate_batches < 1 or (
      args.validate_batch_size < 1):
    raise PlanError("--validate-length must be >= 2, and --pareto-points, --validate-batches "
                    "and --validate-batch-size >= 1.")
  cfg = load_config(args.validate)
  if prof.fingerprint != model_fingerprint(cfg.model):
    raise PlanError(f"--validate {args.validate} is not the model profiled in {args.profile} "
                    "(model fingerprints differ): validate on the profiled run.")
  # The profile's calibration rows: the run's task alone, unless it profiled the training mix.
  task = cfg.data.task_name
  mode = "task" if task is not None and prof.meta.get("calibration", task) == task else "train"
  data = calibration_data(cfg.data, mode)
  guard = None if args.guard_tolerance is None else guard_source(cfg.data)
  trained = load_trained(args.validate)
  scale = None
  if args.measure_heads:
    # A bad or infeasible budget fails in the plain search, before one forward per head.
    search_plan(prof, _budget_arg(args.budget), **search_kw)
    scale = measured_head_scale(trained.model, prof, data, max(search_kw["lengths"] or
                                                               prof.lengths),
                                batches=args.validate_batches,
                                batch_size=args.validate_batch_size)
  plan, records = validate(trained.model, prof, _budget_arg(args.budget), data, length,
                           points=args.pareto_points, batches=args.validate_batches,
                           batch_size=args.validate_batch_size, head_scale=scale,
                           guard_data=guard, guard_tolerance=args.guard_tolerance, **search_kw)
  print(f"validated {len(records)} Pareto plans at N = {length} on {data.source} rows:")
  v = plan.meta["validation"]
  chosen = v["chosen"]
  if guard is not None:
    g = v["guard"]
    verdict = "met" if g["met"] else "no candidate is; least guard loss kept"
    print(f"  guard: {g['source']} loss within {g['tolerance']:g} nats of dense "
          f"{g['dense_loss']:.4f}: {verdict}")
  for i, r in enumerate(records):
    em = "" if r["exact_match"] is None else f", exact match {r['exact_match']:.3f}"
    if guard is not None:
      em += f", {guard.source} loss {r['guard_loss']:.4f}"
    print(f"  {'*' if i == chosen else ' '} weights "
          f"{[round(w, 3) for w in r['length_weights']]}"
          f"{' (measured head scale)' if r['corrected'] else ''}: predicted ΔL "
          f"{r['predicted_loss']:.4g}, measured loss {r['loss']:.4f}{em}")
  return plan


def _baseline(args) -> int:
  from memx.sparse import plan as plans
  from memx.train.restore import load_config

  _check_out(args.out)
  _check_n_sink(args)
  model_cfg = load_config(args.run).model
  lengths = _ints(args.lengths, "--lengths")
  if args.kind == "dense":
    plan = plans.dense_plan(model_cfg, lengths)
  elif args.kind == "uniform":
    plan = plans.uniform_plan(model_cfg, _budget_arg(args.budget), lengths, n_sink=args.n_sink)
  else:
    plan = plans.longgen_plan(model_cfg, _budget_arg(args.budget), lengths, n_sink=args.n_sink)
  out = plan.save(args.out)
  print(_describe(plan))
  print(f"plan: {out}")
  return 0


def _describe(plan) -> str:
  lines = [f"{plan.kind} plan for {plan.n_layers} layers × {plan.n_heads} heads"
           + (f", budget {list(plan.budget)}" if plan.budget else "")
           + (f"; solver {plan.solver}, predicted loss increase {plan.predicted_loss:.4g}"
              if plan.solver else "")]
  for i, rules in enumerate(plan.layers):
    if rules is None:
      lines.append(f"  layer {i}: (unchanged)")
      continue
    lines.append(f"  layer {i}: " + ", ".join(
        "full" if r.beta >= 1.0 and r.alpha >= 0 else f"{r.alpha:g}+{r.beta:g}N/{r.n_sink}s"
        for r in rules))
  for n in plan.lengths:
    kv = (f"decode KV cache {plan.kv_fraction(n):.3f} of dense ({plan.kv_heads} KV heads per "
          "layer, each keeping its query heads' widest span)" if plan.kv_heads is not None else
          f"{plan.kv_fraction(n):.3f} of dense KV slots per query head (an older plan, without "
          "the model's KV heads: under GQA the cache is larger)")
    lines.append(f"  N={n}: density {plan.density(n):.3f} of causal pairs, {kv}")
  return "\n".join(lines)


def _show(args) -> int:
  from memx.sparse.plan import Plan

  print(_describe(Plan.load(args.plan)))
  return 0


def _eval(args) -> int:
  from memx.sparse.evaluate import check_evaluation_name, evaluate, write_evaluation
  from memx.sparse.plan import Plan, check_plan
  from memx.train.restore import load_config, load_trained

  lengths = _ints(args.lengths, "--lengths")
  depths = _floats(args.depths, "--depths")
  if args.batches < 1 or args.batch_size < 1:
    raise UserError(f"--batches {args.batches} and --batch-size {args.batch_size} must be >= 1.")
  if not all(0.0 <= d <= 1.0 for d in depths):
    raise UserError(f"--depths {args.depths} must lie in [0, 1].")
  if args.plan and args.kv_quant is not None:
    raise UserError("--plan and --kv-quant: a plan's per-head ring caches are not quantized; "
                    "evaluate one or the other.")
  plan = Plan.load(args.plan) if args.plan else None
  kv_quant = None
  if args.kv_quant is not None:
    from memx.kernels.kv_quant import KVQuant
    try:
      kv_quant = KVQuant.parse(args.kv_quant)
      kv_quant.check(load_config(args.run).model.head_dim)
    except ValueError as e:
      raise UserError(f"--kv-quant {args.kv_quant}: {e}") from None
  kv_evict = None
  if args.kv_evict is not None:
    from memx.nn.kv_evict import H2O
    if args.plan or args.kv_quant is not None:
      raise UserError("--kv-evict is evaluated alone: drop --plan and --kv-quant.")
    try:
      kv_evict = H2O.parse(args.kv_evict)
    except ValueError as e:
      raise UserError(f"--kv-evict {args.kv_evict}: {e}") from None
  weight_quant = None
  if args.weight_quant is not None:
    from memx.quant.config import WeightQuant
    try:
      weight_quant = WeightQuant.parse(args.weight_quant)
    except ValueError as e:
      raise UserError(f"--weight-quant {args.weight_quant}: {e}") from None
  if plan is not None:
    check_plan(plan, load_config(args.run).model)  # before restoring any weights
  if weight_quant is not None:  # shapes only, before restoring any weights
    from flax import nnx

    from memx.models.transformer import TransformerLM
    from memx.quant.model import check
    model_cfg = load_config(args.run).model
    try:
      check(nnx.eval_shape(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(0))), weight_quant)
    except ValueError as e:
      raise UserError(f"--weight-quant {args.weight_quant}: {e}") from None
  name = args.name or (plan.kind if plan else
                       (kv_quant or kv_evict).name if kv_quant or kv_evict else "dense")
  if weight_quant is not None and not args.name:
    name = weight_quant.name if name == "dense" else f"{weight_quant.name}+{name}"
  check_evaluation_name(name)  # before the evaluation, not after it
  trained = load_trained(args.run, step=args.step)
  quant_stats = None
  if weight_quant is not None:
    quant_stats = _quantize(trained, weight_quant, args.batch_size)
  result = evaluate(trained.model, trained.cfg.data, lengths, plan=plan, depths=depths,
                    batches=args.batches, batch_size=args.batch_size, kv_quant=kv_quant,
                    kv_evict=kv_evict)
  result["plan_file"] = None if args.plan is None else str(pathlib.Path(args.plan).resolve())
  if quant_stats is not None:
    result["weight_quant"] = {**dataclasses.asdict(weight_quant), **quant_stats}
    result["columns"]["weight bits"] = quant_stats["bits_per_weight"]
  out = write_evaluation(trained.run_dir, name, result)
  cols = result["columns"]
  print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in cols.items()))
  print(f"evaluation: {out}")
  return 0
