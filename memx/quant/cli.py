"""`memx quantize RUN --weight-quant SPEC --out DIR`: a trained run's model with quantized
projections, written as a run of its own.

DIR holds config.json (the run's config with model.weight_quant = SPEC and no fine-tuning: a
LoRA run's adapters are merged before quantizing), checkpoints/STEP (the quantized model and a
fresh optimizer state, at the source checkpoint's step) and summary.json (status "done", the
quantization statistics). It is a finished run: `memx eval DIR`, generation, and
`finetune.base = DIR` (LoRA on its frozen quantized weights, with model.weight_quant = SPEC)
all read it. It is written in a temporary directory beside DIR and renamed into place: never
half a run. Its provenance.json names its weights by the source run's identity, the spec, the
step and GPTQ's calibration rows, so fine-tunes built on it go stale when any of them changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import tempfile

from memx.errors import UserError


def add_parser(sub) -> None:
  q = sub.add_parser("quantize", help="quantize a trained run's projections (GPTQ, RTN, NF4) "
                                      "into a run of its own")
  q.add_argument("run")
  q.add_argument("--weight-quant", required=True,
                 metavar="gptq:BITS:GROUP[:CALIB]|rtn:BITS:GROUP|nf4")
  q.add_argument("--out", required=True, help="the quantized run's directory (must not exist)")
  q.add_argument("--step", type=int, default=None, help="the source checkpoint (default newest)")
  q.add_argument("--batch-size", type=int, default=8, help="GPTQ's calibration rows per batch")
  q.set_defaults(handler=_quantize)


def _quantize(args) -> int:
  import jax
  from flax import nnx

  from memx._io import write_json
  from memx.checkpoint import Checkpointer
  from memx.config import FinetuneConfig, to_dict
  from memx.data import make_loader
  from memx.experiment.rundir import write_config
  from memx.models.transformer import TransformerLM
  from memx.nn.lora import merge_lora
  from memx.quant.config import WeightQuant
  from memx.quant.model import check, quantize_model
  from memx.train.finetune import base_hash
  from memx.train.loop import run_identity
  from memx.train.restore import find_run_dir, load_config, load_trained
  from memx.train.step import init_state

  out = pathlib.Path(args.out)
  if out.exists():
    raise UserError(f"--out {out} exists; give a new directory for the quantized run.")
  if args.batch_size < 1:
    raise UserError(f"--batch-size {args.batch_size} must be >= 1.")
  try:
    wq = WeightQuant.parse(args.weight_quant)
  except ValueError as e:
    raise UserError(f"--weight-quant {args.weight_quant}: {e}") from None
  source_dir = find_run_dir(args.run)
  source_cfg = load_config(source_dir)
  if args.step is None:  # as finetune.base: a finished run, or a named checkpoint
    try:
      status = json.loads((source_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
      status = None
    if status != "done":
      raise UserError(f"{args.run} has not finished training (summary.json "
                      f"{'status ' + repr(status) if status else 'missing'}): let it finish, "
                      "or name the checkpoint to quantize with --step.")
  if source_cfg.model.weight_quant is not None:
    raise UserError(f"{args.run} is already quantized (model.weight_quant = "
                    f"{source_cfg.model.weight_quant!r}); quantize the run it came from.")
  try:  # shapes only, before any weights are read
    check(nnx.eval_shape(lambda: TransformerLM(source_cfg.model, rngs=nnx.Rngs(0))), wq)
  except ValueError as e:
    raise UserError(f"--weight-quant {args.weight_quant}: {e}") from None

  trained = load_trained(args.run, step=args.step)
  model = merge_lora(trained.model)
  calib = None
  if wq.method == "gptq":
    loader = make_loader(trained.cfg.data, batch_size=args.batch_size,
                         seed=trained.cfg.train.seed, split="train")
    calib = [loader.local_batch(i) for i in range(wq.calib_batches)]
  stats = quantize_model(model, wq, calib)
  cfg = dataclasses.replace(
      trained.cfg, model=dataclasses.replace(trained.cfg.model, weight_quant=args.weight_quant),
      finetune=FinetuneConfig())
  # The quantized run's own state layout (model with quantized projections + its optimizer),
  # filled with the quantized model.
  ts = init_state(cfg, jax.random.key(0))
  _, opt = nnx.merge(ts.graphdef, ts.state)
  state = nnx.state((model, opt))

  # What names this run's weights for fine-tunes built on it (memx.train.finetune.run_hash):
  # the source's identity, the spec, the step and GPTQ's calibration rows.
  source_id = base_hash(str(source_dir))
  identity = hashlib.sha256(json.dumps(
      [source_id, args.weight_quant, trained.step,
       args.batch_size if wq.method == "gptq" else None]).encode()).hexdigest()[:12]
  try:
    source_data = json.loads((source_dir / "provenance.json").read_text()).get("data_hash")
  except (OSError, ValueError, AttributeError):
    source_data = None
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    write_config(tmp, cfg)
    ckpt = Checkpointer(tmp / "checkpoints", cfg.checkpoint)
    try:
      ckpt.save(trained.step, ckpt.begin(state), {"step": trained.step},
                {"run": run_identity(cfg), "config": to_dict(cfg)})
      ckpt.wait()
    finally:
      ckpt.close()
    write_json(tmp / "provenance.json", {"config_hash": identity, "data_hash": source_data,
                                         "quantized_from": str(source_dir),
                                         "source_identity": source_id})
    write_json(tmp / "summary.json", {
        "name": out.name, "status": "done", "steps": trained.step,
        "quantized_from": str(trained.run_dir), "weight_quant": {
            **dataclasses.asdict(wq), "batch_size": args.batch_size,
            **{k: v for k, v in stats.items() if k != "relative_output_error"}},
        "relative_output_error": stats["relative_output_error"]})
    tmp.rename(out)
  except BaseException as e:  # never half a run: nothing stays behind
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise UserError(f"cannot write the quantized run {out} ({e}).") from None
    raise
  print(f"{wq.name}: {stats['bits_per_weight']:.3f} bits per quantized weight, "
        f"{stats['quantized_bytes'] / 2**20:.2f} MiB for {stats['quantized_weights']:,} weights "
        f"({stats['seconds']:.1f} s)")
  print(f"quantized run: {out}")
  return 0
