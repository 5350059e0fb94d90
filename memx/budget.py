"""`memx budget`: a run's memory per device, FLOPs and time bounds, before it runs (memx.costs).

  memx budget experiments/demo/ablation.py                       # state bytes, FLOPs, decode
  memx budget EXP --set model.n_layers=32 --devices 8 --hardware h100 --activations
  memx budget EXP --decode-batch 8 --decode-context 32768 --kv-bits 2 --json budget.json

State bytes (parameters, optimizer state) are exact for the config's parallel strategy over
--devices devices (nothing is allocated). --activations compiles the train step from abstract
arguments on this machine's backend and adds its temporaries (on CPU, fake devices stand in
for --devices; deep models are compiled at one and two layer periods and extrapolated, unless
--exact). The time floors assume the hardware's peak: a real step or decode takes longer.
"""

from __future__ import annotations

import json
import pathlib

from memx.errors import UserError


def add_parser(sub) -> None:
  b = sub.add_parser("budget", help="memory per device, FLOPs and time bounds of a config, "
                                    "before running it")
  b.add_argument("experiment", help="FILE[:VARIANT]")
  b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="dotted config override, repeatable")
  b.add_argument("--devices", type=int, default=1, help="devices the run's mesh spans")
  b.add_argument("--hardware", default="h100", help="one of h100, h200, a100")
  b.add_argument("--activations", action="store_true",
                 help="compile the train step (abstract arguments) and add its temporaries")
  b.add_argument("--exact", action="store_true",
                 help="with --activations: compile the whole depth, no extrapolation")
  b.add_argument("--decode-batch", type=int, default=1)
  b.add_argument("--decode-context", type=int, default=None,
                 help="decode context length (default data.seq_len)")
  b.add_argument("--kv-bits", type=int, default=None,
                 help="KIVI-quantized KV caches of this many bits (memx.kernels.kv_quant)")
  b.add_argument("--kv-group", type=int, default=32)
  b.add_argument("--kv-residual", type=int, default=0)
  b.add_argument("--compare", action="append", default=[], metavar="NAME:KEY=VALUE[;...]",
                 help="also budget the config with these overrides (';' between them), and "
                      "print a table of every variant against it; repeatable, e.g. "
                      "--compare remat:model.remat=full --compare fp8:optim.moment_quant=fp8")
  b.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
  b.set_defaults(handler=_budget)


def _budget(args) -> int:
  from memx.costs import HARDWARE

  if args.hardware not in HARDWARE:
    raise UserError(f"--hardware {args.hardware!r} is not known; choose one of "
                    f"{', '.join(HARDWARE)}")
  if args.devices < 1 or args.decode_batch < 1 or (
      args.decode_context is not None and args.decode_context < 1):
    raise UserError("--devices, --decode-batch and --decode-context must be >= 1")
  cfg = _config(args)
  variants = {name: _config(args, extra) for name, extra in _compare_specs(args.compare)}
  kv_quant = None
  if args.kv_bits is not None:
    from memx.kernels.kv_quant import KVQuant
    try:
      kv_quant = KVQuant(bits=args.kv_bits, group=args.kv_group, residual=args.kv_residual)
      kv_quant.check(cfg.model.head_dim)
    except ValueError as e:
      raise UserError(f"--kv-bits {args.kv_bits} --kv-group {args.kv_group}: {e}") from None
  if args.activations:
    _set_cpu_devices(args.devices)
  hw = HARDWARE[args.hardware]
  for c in (cfg, *variants.values()):
    _check_devices(c, args.devices)

  def one(c):
    return report(c, args.devices, hw, activations=args.activations, exact=args.exact,
                  decode_batch=args.decode_batch,
                  decode_context=args.decode_context or c.data.seq_len, kv_quant=kv_quant)
  out = one(cfg)
  print(render(out, args.experiment))
  if variants:
    out["compare"] = {name: one(c) for name, c in variants.items()}
    print("\n" + render_comparison(out))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
  return 0


def _config(args, extra: list[str] = ()):
  from memx.experiment import loading
  from memx.experiment.overrides import parse_assignments
  path, variant = loading.split_spec(args.experiment)
  module = loading.load_module(path)
  return loading.build_config(module, variant, parse_assignments([*args.overrides, *extra]))


def _compare_specs(items: list[str]) -> list[tuple[str, list[str]]]:
  out = []
  for item in items:
    name, sep, rest = item.partition(":")
    assignments = [a for a in rest.split(";") if a]
    if not sep or not name or not assignments or any("=" not in a for a in assignments):
      raise UserError(f"--compare {item!r} is not of the form NAME:KEY=VALUE[;KEY=VALUE...]")
    if name in dict(out) or name == "base":
      raise UserError(f"--compare: the name {name!r} is taken (by 'base' or an earlier one)")
    out.append((name, assignments))
  return out


def _check_devices(cfg, devices: int) -> None:
  """UserError unless cfg's mesh fits `devices` devices and its batch splits over them."""
  from memx.parallel.axes import BATCH
  from memx.parallel.rules import RULES, shards
  try:
    shape = cfg.parallel.resolved_shape(devices)
  except ValueError as e:
    raise UserError(f"--devices {devices}: {e}") from None
  data = shards(dict(RULES[cfg.parallel.strategy])[BATCH],
                dict(zip(cfg.parallel.mesh_axes, shape, strict=True)))
  if cfg.train.batch_size % data:
    raise UserError(f"--devices {devices}: train.batch_size = {cfg.train.batch_size} does not "
                    f"split over the data-parallel size {data} of that mesh")


def _set_cpu_devices(n: int) -> None:
  """Fake CPU devices for the compile when the CPU backend has not started yet (GPU backends
  ignore the setting)."""
  import jax
  try:
    jax.config.update("jax_num_cpu_devices", max(n, 1))
  except RuntimeError:  # a backend already started: keep what it has
    pass


def report(cfg, devices: int, hw, *, activations: bool = False, exact: bool = False,
           decode_batch: int = 1, decode_context: int | None = None, kv_quant=None) -> dict:
  """The numbers `memx budget` prints (bytes per device, FLOPs, seconds), as a dict."""
  import jax

  from memx import costs
  from memx.config import config_hash

  state = costs.state_bytes(cfg, devices)
  out = {"config_hash": config_hash(cfg), "devices": devices, "hardware": hw.name,
         "mesh": dict(zip(cfg.parallel.mesh_axes, cfg.parallel.resolved_shape(devices),
                          strict=True)),
         "strategy": cfg.parallel.strategy, **state}
  total = state["params"] + state["optimizer"] + state.get("teacher", 0)
  if activations:
    avail = jax.devices()
    if len(avail) < devices:
      raise UserError(f"--activations needs {devices} devices to compile on; this "
                      f"{jax.default_backend()} backend has {len(avail)}")
    temps = costs.step_temp_bytes(cfg, avail[:devices], extrapolate=not exact)
    out["step_temp"] = temps["temp"]
    out["step_temp_compiled_layers"] = temps["compiled_layers"]
    out["step_temp_extrapolated"] = temps["extrapolated"]
    out["compiled_on"] = jax.default_backend()
    total += temps["temp"]
  out["total_per_device"] = total
  out["device_memory"] = hw.memory
  out["fits"] = total <= hw.memory
  flops = costs.train_flops_per_token(cfg)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  out["train_flops_per_token"] = flops
  out["train_flops_per_step"] = flops * tokens
  out["step_time_floor_s"] = flops * tokens / (devices * hw.bf16_flops)
  context = decode_context or cfg.data.seq_len
  dec = costs.decode_bytes(cfg, decode_batch, context, kv_quant=kv_quant)
  moved = dec["weights"] + dec["state"]
  out["decode"] = {"batch": decode_batch, "context": context, "weights": dec["weights"],
                   "state": dec["state"], "kv_bits": None if kv_quant is None else kv_quant.bits,
                   "step_time_floor_s": moved / hw.bandwidth,
                   "tokens_per_s_ceiling": decode_batch * hw.bandwidth / moved}
  return out


def _gib(n: int | float) -> str:
  return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def _ms(seconds: float) -> str:
  return f"{1e3 * seconds:.3g} ms"


def render(out: dict, name: str) -> str:
  mesh = " × ".join(f"{a} {n}" for a, n in out["mesh"].items())
  lines = [f"# budget: {name} (config {out['config_hash']})", "",
           f"{out['param_count']:,} parameters ({out['trainable_count']:,} trained); strategy "
           f"{out['strategy']} over {out['devices']} device(s) ({mesh}); {out['hardware']}", "",
           "| per device | bytes | |", "|---|---:|---:|",
           f"| parameters | {out['params']:,} | {_gib(out['params'])} |",
           f"| optimizer state | {out['optimizer']:,} | {_gib(out['optimizer'])} |"]
  if "teacher" in out:
    lines.append(f"| teacher (teacher.run, frozen) | {out['teacher']:,} | "
                 f"{_gib(out['teacher'])} |")
  if "step_temp" in out:
    how = ("extrapolated from " + " and ".join(map(str, out["step_temp_compiled_layers"]))
           + " layers" if out["step_temp_extrapolated"] else "compiled whole")
    lines.append(f"| step temporaries ({out['compiled_on']} XLA, {how}) | {out['step_temp']:,} "
                 f"| {_gib(out['step_temp'])} |")
  else:
    lines.append(f"| step temporaries | (--activations) | ≥ {_gib(out['trainable'])} of "
                 f"gradients |")
  verdict = "fits" if out["fits"] else "does NOT fit"
  lines += [f"| **total** | {out['total_per_device']:,} | {_gib(out['total_per_device'])} |",
            f"| device memory | {out['device_memory']:,} | {_gib(out['device_memory'])}: "
            f"{verdict} ({100 * out['total_per_device'] / out['device_memory']:.1f}%) |", "",
            f"Training: {out['train_flops_per_token'] / 1e9:,.3f} GFLOP per token, "
            f"{out['train_flops_per_step'] / 1e12:,.3f} TFLOP per step; at the devices' bf16 "
            f"peak a step takes at least {_ms(out['step_time_floor_s'])} "
            f"({_ms(out['step_time_floor_s'] / 0.4)} at 40% MFU).", ""]
  d = out["decode"]
  quant = "" if d["kv_bits"] is None else f", {d['kv_bits']}-bit KV"
  lines.append(
      f"Decoding on one device (batch {d['batch']}, context {d['context']:,}{quant}): each "
      f"step reads {_gib(d['weights'])} of weights and {_gib(d['state'])} of decode state, "
      f"so it takes at least {_ms(d['step_time_floor_s'])}: at most "
      f"{d['tokens_per_s_ceiling']:,.0f} tokens/s.")
  return "\n".join(lines)


def render_comparison(out: dict) -> str:
  """A table of the base config and each --compare variant: bytes per device, their ratio to
  the base's total, whether each fits, and the step-time floor."""
  rows = [("base", out), *out["compare"].items()]
  temps = "step_temp" in out
  head = ["variant", "parameters", "optimizer state", *(["step temporaries"] if temps else []),
          "total", "× base", "fits", "step floor"]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for name, o in rows:
    cells = [name, _gib(o["params"]), _gib(o["optimizer"]),
             *([_gib(o["step_temp"])] if temps else []), _gib(o["total_per_device"]),
             f"{o['total_per_device'] / out['total_per_device']:.3f}",
             "yes" if o["fits"] else "NO", _ms(o["step_time_floor_s"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
