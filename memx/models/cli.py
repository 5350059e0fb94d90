"""`memx generate`: text from a trained run, optionally drafted by a second run (speculative
decoding, memx.models.speculative).

  memx generate RUN --prompt "Once upon a time" --max-new-tokens 64
  memx generate RUN --prompt-ids 257,72,105 --temperature 0.8 --seed 3 --samples 4
  memx generate RUN --draft SMALL_RUN --draft-len 4      (same tokens at temperature 0)

With --draft the tokens are those of plain generation at temperature 0 (float32; bfloat16
rounding may settle near-ties differently), except for runs with a sparse plan whose spans
grow with the length: the plan's N is then the cache length, prompt + new + draft_len - 1
instead of prompt + new.

Prints the continuation (bytes as text for the byte tokenizer, else ids) and a line of
numbers: seconds (compile included; with --time the call runs again and only that run is
timed, tokens per second) and, with a draft, target passes, acceptance and tokens per pass.
--json FILE writes them too.
"""

from __future__ import annotations

import math
import pathlib
import time

from memx.errors import UserError


def add_parser(sub) -> None:
  g = sub.add_parser("generate", help="sample text from a trained run (optionally speculative "
                                      "with a draft run)")
  g.add_argument("run", help="run directory (or its checkpoints/)")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="prompt text (byte-tokenized runs)")
  src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--samples", type=int, default=1, help="rows generated from the prompt")
  g.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  g.add_argument("--draft", default=None, metavar="RUN",
                 help="a run over the same vocabulary that drafts tokens for this one to check "
                      "(speculative decoding: the output is distributed as without it)")
  g.add_argument("--draft-step", type=int, default=None)
  g.add_argument("--draft-len", type=int, default=4, help="tokens drafted per target pass")
  g.add_argument("--time", action="store_true",
                 help="run a second time and report that run's tokens/s (compile excluded)")
  g.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
  g.set_defaults(handler=_generate)


def _byte_ids(cfg) -> bool:
  """Whether the run's token ids are the byte tokenizer's (not those of "npy" token files)."""
  return cfg.data.source != "npy" or cfg.data.vocab_size is None

def _prompt_ids(args, cfg) -> list[int]:
  from memx.data.tokenizer import ByteTokenizer
  if args.prompt is not None:
    if not _byte_ids(cfg):
      raise UserError(f"--prompt: run {args.run} was trained on token files of another "
                      f"tokenizer (data.vocab_size = {cfg.data.vocab_size}); give --prompt-ids")
    ids = ByteTokenizer().encode(args.prompt).tolist()
    if not ids:
      raise UserError("--prompt is empty; give at least one character.")
    return ids
  try:
    ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
  except ValueError:
    raise UserError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers."
                    ) from None
  if not ids or min(ids) < 0 or max(ids) >= cfg.model.vocab_size:
    raise UserError(f"--prompt-ids must list ids in [0, {cfg.model.vocab_size}) (the model's "
                    f"vocabulary), got {args.prompt_ids!r}.")
  return ids


def _check_args(args) -> None:
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 1.")
  if args.samples < 1:
    raise UserError(f"--samples {args.samples} must be >= 1.")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise UserError(f"--temperature {args.temperature} must be finite and >= 0 (0: greedy).")
  if args.draft_len < 1:
    raise UserError(f"--draft-len {args.draft_len} must be >= 1.")
  if args.draft is None and (args.draft_step is not None or args.draft_len != 4):
    raise UserError("--draft-step and --draft-len need --draft RUN.")


def _timed(fn, again: bool):
  """(fn()'s result, its seconds); again: a first call compiles and the second is timed."""
  import jax
  if again:
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def _generate(args) -> int:
  _check_args(args)
  import jax
  import jax.numpy as jnp

  from memx._io import write_json
  from memx.data.tokenizer import ByteTokenizer
  from memx.models.decode import generate
  from memx.models.speculative import speculative_generate
  from memx.train.restore import load_config, load_trained

  cfg = load_config(args.run)
  ids = _prompt_ids(args, cfg)
  if args.draft is not None:  # everything checkable before any weights load
    draft_cfg = load_config(args.draft)
    if draft_cfg.model.vocab_size != cfg.model.vocab_size:
      raise UserError(f"--draft {args.draft}: its vocabulary ({draft_cfg.model.vocab_size}) is "
                      f"not the run's ({cfg.model.vocab_size}); a draft must share the target's "
                      f"token ids.")
  prompt = jnp.asarray([ids] * args.samples, jnp.int32)
  rng = jax.random.key(args.seed)
  model = load_trained(args.run, step=args.step).model
  result = {"run": str(pathlib.Path(args.run).resolve()), "prompt_ids": ids,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed}
  try:
    if args.draft is None:
      out, seconds = _timed(lambda: generate(model, prompt, args.max_new_tokens,
                                             temperature=args.temperature, rng=rng), args.time)
    else:
      draft = load_trained(args.draft, step=args.draft_step).model
      stats = []

      def run():
        tokens, s = speculative_generate(model, draft, prompt, args.max_new_tokens,
                                         draft_len=args.draft_len,
                                         temperature=args.temperature, rng=rng)
        stats.append(s)
        return tokens
      out, seconds = _timed(run, args.time)
      s = stats[-1]
      result.update(draft=str(pathlib.Path(args.draft).resolve()), draft_len=args.draft_len,
                    target_passes=s.rounds, accepted=s.accepted, drafted=s.drafted,
                    acceptance=s.acceptance, tokens_per_pass=s.tokens_per_round)
  except ValueError as e:
    raise UserError(str(e)) from None
  new = [row[len(ids):] for row in out.tolist()]
  result.update(tokens=new, seconds=seconds, compile_included=not args.time)
  if args.time:
    result["tokens_per_s"] = args.samples * args.max_new_tokens / seconds
  byte_ids = _byte_ids(cfg)
  if byte_ids:
    result["text"] = [ByteTokenizer().decode(row) for row in new]
  for i, row in enumerate(new):
    shown = result["text"][i] if byte_ids else ",".join(map(str, row))
    print(f"[{i}] {shown}" if args.samples > 1 else shown)
  line = (f"{result['tokens_per_s']:.1f} tokens/s" if args.time else
          f"{seconds:.2f} s (compile included; --time measures tokens/s)")
  if args.draft is not None:
    line += (f"; {result['target_passes']} target passes, acceptance "
             f"{result['acceptance']:.2f}, {result['tokens_per_pass']:.2f} tokens per pass")
  print(line)
  if args.json:
    write_json(args.json, result)
  return 0
