"""Synthetic memory tasks: MQAR, passkey retrieval and selective copying, one row at a time.

Every task is a pure function of a numpy Generator and the task's settings that returns a
`TaskRow`: `tokens` int32[seq_len + 1] and `answer_mask` bool[seq_len + 1], where
`answer_mask[i]` marks that `tokens[i]` is an answer token. A loader feeds
`inputs = tokens[:-1]`, `targets = tokens[1:]`, so the positions whose *target* is an answer are
`answer_mask[1:]`. Ids are ByteTokenizer ids (bytes 0..255 plus its specials), so task rows mix
freely with text rows.

Each task also has an `*_answers(tokens)` function that re-derives, from the prompt alone, where
the answers go and what they must be; `verify_row` uses it to check a generated row, and the
same functions tell what a correct model must predict.
"""

import functools
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Int

from memx.data.config import DataConfig
from memx.data.tokenizer import ByteTokenizer
from memx.errors import DataError

_TOK = ByteTokenizer()
BOS, SEP, BLANK = _TOK.BOS, _TOK.SEP, _TOK.BLANK

# MQAR keys and values come from disjoint id ranges (Zoology draws them from the two halves of
# the vocabulary), so a model can tell a key from a value by its id alone.
MQAR_KEY_RANGE = (0, 128)
MQAR_VALUE_RANGE = (128, 256)
# Selective copying draws data tokens from a 16-token vocabulary, as in the Mamba paper (here the
# letters a..p, so rows stay readable when decoded).
COPY_DATA_RANGE = (ord("a"), ord("a") + 16)

# Passkey prompt, after Mohtashami & Jaggi (Landmark Attention) and the needle-in-a-haystack
# tests that followed; the filler before and after the needle is cut from one stream.
PASSKEY_FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  b"There and back again. ")
_NEEDLE = b" The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = b" What is the pass key? The pass key is "
_NEEDLE_RE = re.compile(rb"The pass key is (\d+)\. Remember it\. \1 is the pass key\.")


class TaskRow(NamedTuple):
  """One synthetic row: tokens and the positions of answer tokens within them."""

  tokens: Int[np.ndarray, " T+1"]
  answer_mask: Bool[np.ndarray, " T+1"]


def _too_short(task: str, seq_len: int, minimum: int, why: str, knob: str) -> DataError:
  return DataError(
      f"data.seq_len = {seq_len} is too short for the {task!r} task: it needs data.seq_len >= "
      f"{minimum} ({why}; a row holds seq_len + 1 tokens). Raise data.seq_len or lower "
      f"data.{knob}.")


def _row(tokens: np.ndarray, answer_positions: np.ndarray) -> TaskRow:
  mask = np.zeros(tokens.shape, dtype=bool)
  mask[answer_positions] = True
  return TaskRow(tokens.astype(np.int32), mask)


# ----------------------------------------------------------------------------------------------
# MQAR: multi-query associative recall (Zoology, Arora et al. 2023; Based).


def mqar_min_seq_len(num_pairs: int) -> int:
  """Shortest seq_len that fits `num_pairs` MQAR pairs: BOS, 2N context, SEP, 2N queries."""
  return 4 * num_pairs + 1


def mqar(rng: np.random.Generator, seq_len: int, *, num_pairs: int,
         key_range: tuple[int, int] = MQAR_KEY_RANGE,
         value_range: tuple[int, int] = MQAR_VALUE_RANGE) -> TaskRow:
  """Multi-query associative recall: key-value pairs, then every key queried once.

  Layout (length seq_len + 1): `BOS k1 v1 k2 v2 ... kN vN SEP` then the query region, in which
  each key appears once (in random order) immediately followed by its value, at random
  non-overlapping places; the other query slots are BLANK. The answers are the values in the
  query region. Keys within a row are distinct, and so are values (as in Zoology). Zoology
  spaces queries with a power law; here the spacing is uniform.

  Args:
    rng: the row's randomness.
    seq_len: model sequence length; the row holds seq_len + 1 tokens.
    num_pairs: N, key-value pairs per row.
    key_range: [lo, hi) ids keys are drawn from.
    value_range: [lo, hi) ids values are drawn from; must not overlap key_range.

  Returns:
    The row; answer_mask marks the N query values.

  Raises:
    DataError: seq_len < 4N + 1, or N exceeds the number of distinct keys/values.
  """
  if set(range(*key_range)) & set(range(*value_range)):
    raise DataError(f"mqar: key_range {key_range} and value_range {value_range} overlap; "
                    "keys and values must come from disjoint id ranges.")
  n_keys, n_values = key_range[1] - key_range[0], value_range[1] - value_range[0]
  if num_pairs > min(n_keys, n_values):
    raise DataError(
        f"data.mqar_pairs = {num_pairs} is too many: keys (and values) within a row are "
        f"distinct and drawn from {n_keys} key ids and {n_values} value ids, so at most "
        f"{min(n_keys, n_values)} pairs fit.")
  minimum = mqar_min_seq_len(num_pairs)
  if seq_len < minimum:
    raise _too_short("mqar", seq_len, minimum, f"{num_pairs} pairs take BOS + {2 * num_pairs} "
                     f"context tokens + SEP + {2 * num_pairs} query tokens", "mqar_pairs")
  keys = key_range[0] + rng.choice(n_keys, num_pairs, replace=False)
  values = value_range[0] + rng.choice(n_values, num_pairs, replace=False)

  tokens = np.full(seq_len + 1, BLANK, dtype=np.int32)
  tokens[0] = BOS
  tokens[1:1 + 2 * num_pairs:2] = keys
  tokens[2:2 + 2 * num_pairs:2] = values
  q0 = 2 + 2 * num_pairs  # first slot of the query region, after SEP
  tokens[q0 - 1] = SEP
  # N non-overlapping 2-slot queries in a region of R slots: choose N distinct sorted c_i from
  # [0, R - N); start_i = c_i + i leaves every consecutive pair of starts >= 2 apart.
  region = seq_len + 1 - q0
  starts = q0 + np.sort(rng.choice(region - num_pairs, num_pairs, replace=False))
  starts += np.arange(num_pairs)
  order = rng.permutation(num_pairs)
  tokens[starts] = keys[order]
  tokens[starts + 1] = values[order]
  return _row(tokens, starts + 1)


def mqar_answers(tokens) -> tuple[np.ndarray, np.ndarray]:
  """Where an MQAR row's answers go and what they must be, read from its prompt alone.

  Args:
    tokens: a row as laid out by `mqar` (length seq_len + 1).

  Returns:
    (positions, values): each non-BLANK token in the query region is a key, so the value paired
    with it in the context must follow it at the next position.
  """
  tokens = np.asarray(tokens)
  sep = int(np.flatnonzero(tokens == SEP)[0])
  context = tokens[1:sep]
  pairs = dict(zip(context[0::2].tolist(), context[1::2].tolist(), strict=True))
  positions, values = [], []
  i = sep + 1
  while i < len(tokens):
    if tokens[i] != BLANK:
      positions.append(i + 1)
      values.append(pairs[int(tokens[i])])
      i += 2
    else:
      i += 1
  return np.asarray(positions, dtype=np.int64), np.asarray(values, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# Passkey retrieval / needle in a haystack.


def passkey_min_seq_len(digits: int) -> int:
  """Shortest seq_len for a passkey row: BOS, needle, question and answer with no filler."""
  return len(_NEEDLE) - 10 + 2 * digits + len(_QUESTION) + digits  # (-10: two "{key}")


def passkey(rng: np.random.Generator, seq_len: int, *, digits: int,
            depth: float | None = None, filler: bytes | None = None,
            min_len: int | None = None) -> TaskRow:
  """Passkey retrieval: a random number hidden in filler text, asked for at the end.

  Layout (length seq_len + 1): `BOS filler[:k] NEEDLE filler[k:] QUESTION key`, with
  NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. " and
  QUESTION = " What is the pass key? The pass key is ". The answer is the key's digits, the
  last `digits` tokens of the row. k = round(depth * filler length).

  With `min_len`, that prompt ends at a random length L in [min_len, seq_len] (uniform) and
  the rest of the row continues the filler: `BOS prompt(L) filler...`. The answer then sits at
  L + 1 - digits .. L, so training rows ask the question at every position up to seq_len and
  a model learns to retrieve at every length, not only at seq_len (a model trained on
  full-length rows alone may retrieve at no other length).

  Args:
    rng: the row's randomness.
    seq_len: model sequence length (bytes of context); the row holds seq_len + 1 tokens.
    digits: digits of the key (leading zeros allowed).
    depth: where the needle sits, as a fraction of the prompt's filler (0 = start, 1 = just
      before the question); None draws it uniformly per row.
    filler: text to cut the filler from (a random window of it, e.g. the embedded corpus);
      None repeats PASSKEY_FILLER ("The grass is green. ...").
    min_len: shortest prompt (see above); None: the prompt spans the row.

  Returns:
    The row; answer_mask marks the key's digits.

  Raises:
    DataError: seq_len (or min_len) is below passkey_min_seq_len(digits), or min_len is above
      seq_len.
  """
  minimum = passkey_min_seq_len(digits)
  if seq_len < minimum:
    raise _too_short("passkey", seq_len, minimum, f"the needle, question and {digits}-digit "
                     "answer, with no filler at all", "passkey_digits")
  if min_len is not None and not minimum <= min_len <= seq_len:
    raise DataError(f"passkey_min_len = {min_len} is not allowed: it must lie in [{minimum}, "
                    f"{seq_len}] (the shortest {digits}-digit passkey prompt, data.seq_len).")
  length = seq_len if min_len is None else int(rng.integers(min_len, seq_len + 1))
  key = (ord("0") + rng.integers(0, 10, size=digits)).astype(np.uint8).tobytes()
  needle = _NEEDLE.replace(b"{key}", key)
  n_filler = length + 1 - 1 - len(needle) - len(_QUESTION) - digits
  n_hay = n_filler + seq_len - length  # the prompt's filler, then the tail's
  if filler:
    # Tile only a filler shorter than the window; slicing the corpus itself copies nothing big.
    source = filler * (n_hay // len(filler) + 1) if n_hay > len(filler) else filler
    start = int(rng.integers(0, len(source) - n_hay + 1))
  else:
    source = PASSKEY_FILLER * (n_hay // len(PASSKEY_FILLER) + 1)
    start = 0
  hay = source[start:start + n_hay]
  d = rng.uniform() if depth is None else depth
  k = int(round(d * n_filler))
  text = hay[:k] + needle + hay[k:n_filler] + _QUESTION + key + hay[n_filler:]
  tokens = np.concatenate([[BOS], np.frombuffer(text, dtype=np.uint8)]).astype(np.int32)
  assert len(tokens) == seq_len + 1
  return _row(tokens, np.arange(length + 1 - digits, length + 1))


def passkey_answers(tokens) -> tuple[np.ndarray, np.ndarray]:
  """Where a passkey row's answer goes and what it must be, read from its prompt alone.

  Args:
    tokens: a row as laid out by `passkey`.

  Returns:
    (positions, digits): the key stated by the needle, expected right after the first
    question that follows the needle (the row's last tokens unless the row has a tail).

  Raises:
    ValueError: the row has no needle, or no question after it with room for the answer.
  """
  tokens = np.asarray(tokens)
  text = bytes(int(t) if t < 256 else 0 for t in tokens)
  m = _NEEDLE_RE.search(text)
  if m is None:
    raise ValueError("passkey row has no needle")
  key = m.group(1)
  q = text.find(_QUESTION, m.end())
  if q < 0 or q + len(_QUESTION) + len(key) > len(tokens):
    raise ValueError("passkey row has no question after its needle, with room for the answer")
  start = q + len(_QUESTION)
  return np.arange(start, start + len(key)), np.frombuffer(key, dtype=np.uint8).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Selective copying (Gu & Dao, Mamba, 2023).


def selective_copy_min_seq_len(copy_tokens: int) -> int:
  """Shortest seq_len for selective copying: BOS, C data slots, SEP, C answers."""
  return 2 * copy_tokens + 1


def selective_copy(rng: np.random.Generator, seq_len: int, *, copy_tokens: int,
                   data_range: tuple[int, int] = COPY_DATA_RANGE) -> TaskRow:
  """Selective copying: data tokens scattered among BLANKs, to be copied out in order.

  Layout (length seq_len + 1): `BOS` then a region of seq_len - C - 1 slots holding C data
  tokens at random positions (BLANK elsewhere), then `SEP`, then the C data tokens in order
  (the answers). Data tokens are drawn with replacement from data_range, as in the paper.

  Args:
    rng: the row's randomness.
    seq_len: model sequence length; the row holds seq_len + 1 tokens.
    copy_tokens: C, data tokens to copy.
    data_range: [lo, hi) ids data tokens are drawn from.

  Returns:
    The row; answer_mask marks the C tokens after SEP.

  Raises:
    DataError: seq_len < 2C + 1.
  """
  minimum = selective_copy_min_seq_len(copy_tokens)
  if seq_len < minimum:
    raise _too_short("selective_copy", seq_len, minimum, f"{copy_tokens} data tokens take BOS "
                     f"+ at least {copy_tokens} region slots + SEP + {copy_tokens} answers",
                     "copy_tokens")
  data = rng.integers(*data_range, size=copy_tokens)
  region = seq_len - copy_tokens - 1
  tokens = np.full(seq_len + 1, BLANK, dtype=np.int32)
  tokens[0] = BOS
  tokens[1 + np.sort(rng.choice(region, copy_tokens, replace=False))] = data
  sep = 1 + region
  tokens[sep] = SEP
  tokens[sep + 1:] = data
  return _row(tokens, np.arange(sep + 1, seq_len + 1))


def selective_copy_answers(tokens) -> tuple[np.ndarray, np.ndarray]:
  """Where a selective-copying row's answers go and what they must be, from its prompt alone.

  Args:
    tokens: a row as laid out by `selective_copy`.

  Returns:
    (positions, tokens): the non-BLANK tokens between BOS and SEP, in order, expected right
    after SEP.
  """
  tokens = np.asarray(tokens)
  sep = int(np.flatnonzero(tokens == SEP)[0])
  region = tokens[1:sep]
  data = region[region != BLANK].astype(np.int32)
  return np.arange(sep + 1, sep + 1 + len(data)), data


# ----------------------------------------------------------------------------------------------
# Registry and config binding.

ANSWERS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "mqar": mqar_answers,
    "passkey": passkey_answers,
    "selective_copy": selective_copy_answers,
}


def verify_row(task: str, tokens, answer_mask) -> bool:
  """True when a row's answer tokens and answer mask are exactly what its prompt implies.

  Args:
    task: "mqar", "passkey" or "selective_copy".
    tokens: int[seq_len + 1] row (or a model's completion of one).
    answer_mask: bool[seq_len + 1], True at answer tokens.
  """
  tokens, answer_mask = np.asarray(tokens), np.asarray(answer_mask, dtype=bool)
  try:
    positions, answers = ANSWERS[task](tokens)
  except (ValueError, KeyError, IndexError):
    return False
  if len(positions) and positions.max() >= len(tokens):
    return False
  expected = np.zeros(len(tokens), dtype=bool)
  expected[positions] = True
  return bool(np.array_equal(expected, answer_mask)
              and np.array_equal(tokens[positions], answers))


def min_seq_len(cfg: DataConfig, task: str) -> int:
  """Shortest data.seq_len that `task` fits in with cfg's settings."""
  return {"mqar": lambda: mqar_min_seq_len(cfg.mqar_pairs),
          "passkey": lambda: passkey_min_seq_len(cfg.passkey_digits),
          "selective_copy": lambda: selective_copy_min_seq_len(cfg.copy_tokens)}[task]()


def task_settings(cfg: DataConfig, task: str) -> str:
  """A stable description of the task's settings (goes into the loader's data hash)."""
  if task == "mqar":
    return f"mqar(pairs={cfg.mqar_pairs},keys={MQAR_KEY_RANGE},values={MQAR_VALUE_RANGE})"
  if task == "passkey":
    min_len = "" if cfg.passkey_min_len is None else f",min_len={cfg.passkey_min_len}"
    return (f"passkey(digits={cfg.passkey_digits},depth={cfg.passkey_depth},"
            f"filler={cfg.passkey_filler}{min_len})")
  if task == "selective_copy":
    return f"selective_copy(copy_tokens={cfg.copy_tokens},data={COPY_DATA_RANGE})"
  raise DataError(f"unknown task {task!r}; expected one of {sorted(ANSWERS)}")


def make_task(cfg: DataConfig, task: str, *,
              filler: bytes | None = None) -> Callable[[np.random.Generator], TaskRow]:
  """Binds a task to cfg's seq_len and settings: returns `rng -> TaskRow`.

  Args:
    cfg: the data config (seq_len, mqar_pairs, passkey_digits/depth, copy_tokens).
    task: "mqar", "passkey" or "selective_copy".
    filler: passkey filler text (used when cfg.passkey_filler == "corpus").

  Raises:
    DataError: cfg.seq_len is too short for the task, or the task's settings are impossible.
  """
  if task not in ANSWERS:
    raise DataError(f"unknown task {task!r}; expected one of {sorted(ANSWERS)}")
  if task == "mqar":
    fn = functools.partial(mqar, seq_len=cfg.seq_len, num_pairs=cfg.mqar_pairs)
  elif task == "passkey":
    fn = functools.partial(passkey, seq_len=cfg.seq_len, digits=cfg.passkey_digits,
                           depth=cfg.passkey_depth, filler=filler, min_len=cfg.passkey_min_len)
  else:
    fn = functools.partial(selective_copy, seq_len=cfg.seq_len, copy_tokens=cfg.copy_tokens)
  fn(np.random.default_rng(0))  # fail now, with the task's message, not mid-training
  return fn
