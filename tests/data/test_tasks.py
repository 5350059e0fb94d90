"""Synthetic tasks: answers are right and answer masks mark exactly them.

The checkers here are written from each task's published definition, independently of
memx.data.tasks (they share only the token ids), so a generator bug cannot hide behind itself.
"""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memx.data import (
    ByteTokenizer,
    DataConfig,
    make_task,
    mqar,
    passkey,
    selective_copy,
    verify_row,
)
from memx.errors import DataError

BOS, SEP, BLANK = 257, 259, 260
assert (ByteTokenizer.BOS, ByteTokenizer.SEP, ByteTokenizer.BLANK) == (BOS, SEP, BLANK)


def check_mqar(tokens, mask, n):
  tokens, mask = tokens.tolist(), mask.tolist()
  assert tokens[0] == BOS and tokens[2 * n + 1] == SEP
  keys, values = tokens[1:2 * n + 1:2], tokens[2:2 * n + 2:2]
  assert len(set(keys)) == n, "keys within a row must be distinct"
  assert all(0 <= k < 128 for k in keys) and all(128 <= v < 256 for v in values)
  paired = dict(zip(keys, values, strict=True))
  queried = []
  for i in range(2 * n + 2, len(tokens)):
    if mask[i]:
      # The token before an answer is a queried key; the answer is its value from the context.
      assert tokens[i - 1] in paired
      assert tokens[i] == paired[tokens[i - 1]]
      queried.append(tokens[i - 1])
    elif not (i + 1 < len(tokens) and mask[i + 1]):
      assert tokens[i] == BLANK
  assert sorted(queried) == sorted(keys), "every key is queried exactly once"
  assert not any(mask[:2 * n + 2])


def check_passkey(tokens, mask, digits, depth=None):
  assert tokens[0] == BOS and (tokens[1:] < 256).all()
  text = bytes(tokens[1:].astype(np.uint8)).decode("latin-1")
  found = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text)
  assert len(found) == 1 and found[0][0] == found[0][1] and len(found[0][0]) == digits
  key = found[0][0]
  assert text.endswith("What is the pass key? The pass key is " + key)
  want = np.zeros(len(tokens), bool)
  want[-digits:] = True
  np.testing.assert_array_equal(mask, want)
  if depth is not None:
    start = text.index(" The pass key is")
    filler = len(text) - len(" The pass key is . Remember it.  is the pass key. ") - 2 * digits \
        - len(" What is the pass key? The pass key is ") - digits
    assert abs(start - depth * filler) <= 1


def check_selective_copy(tokens, mask, c):
  tokens = tokens.tolist()
  assert tokens[0] == BOS
  sep = len(tokens) - c - 1
  assert tokens[sep] == SEP and SEP not in tokens[:sep]
  data = [t for t in tokens[1:sep] if t != BLANK]
  assert len(data) == c and all(ord("a") <= t < ord("a") + 16 for t in data)
  assert tokens[sep + 1:] == data
  np.testing.assert_array_equal(mask, [i > sep for i in range(len(tokens))])


def _basic(row, seq_len):
  assert row.tokens.shape == (seq_len + 1,) and row.tokens.dtype == np.int32
  assert row.answer_mask.shape == (seq_len + 1,) and row.answer_mask.dtype == bool


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 40), extra=st.integers(0, 100))
def test_mqar(seed, n, extra):
  seq_len = 4 * n + 1 + extra
  row = mqar(np.random.default_rng(seed), seq_len, num_pairs=n)
  _basic(row, seq_len)
  check_mqar(row.tokens, row.answer_mask, n)
  assert row.answer_mask.sum() == n
  assert verify_row("mqar", *row)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), digits=st.integers(1, 32), extra=st.integers(0, 400),
       depth=st.one_of(st.none(), st.floats(0, 1)), corpus=st.booleans())
def test_passkey(seed, digits, extra, depth, corpus):
  from memx.data import load_corpus
  from memx.data.tasks import passkey_min_seq_len

  seq_len = passkey_min_seq_len(digits) + extra
  filler = load_corpus()[0] if corpus else None
  row = passkey(np.random.default_rng(seed), seq_len, digits=digits, depth=depth, filler=filler)
  _basic(row, seq_len)
  check_passkey(row.tokens, row.answer_mask, digits, depth)
  assert verify_row("passkey", *row)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), digits=st.integers(1, 8), extra=st.integers(0, 300),
       depth=st.one_of(st.none(), st.floats(0, 1)), corpus=st.booleans(), data=st.data())
def test_passkey_min_len_asks_at_a_random_length(seed, digits, extra, depth, corpus, data):
  from memx.data import load_corpus
  from memx.data.tasks import passkey_min_seq_len

  seq_len = passkey_min_seq_len(digits) + extra
  min_len = data.draw(st.integers(passkey_min_seq_len(digits), seq_len))
  filler = load_corpus()[0] if corpus else None
  row = passkey(np.random.default_rng(seed), seq_len, digits=digits, depth=depth,
                filler=filler, min_len=min_len)
  _basic(row, seq_len)
  end = int(np.flatnonzero(row.answer_mask)[-1])  # the prompt is row[:end + 1]
  assert min_len <= end <= seq_len and row.answer_mask.sum() == digits
  check_passkey(row.tokens[:end + 1], row.answer_mask[:end + 1], digits, depth)
  tail = bytes(row.tokens[end + 1:].astype(np.uint8))
  assert b"pass key" not in tail  # the tail is filler: no second needle or question
  assert verify_row("passkey", *row)


def test_passkey_min_len_spreads_lengths_and_keeps_full_rows_unchanged():
  ends = {int(np.flatnonzero(passkey(np.random.default_rng(s), 200, digits=3,
                                     min_len=100).answer_mask)[-1]) for s in range(300)}
  assert min(ends) < 110 and max(ends) > 190 and len(ends) > 60
  # min_len = seq_len, or None, is the classic full-length row (same randomness, same row).
  a = passkey(np.random.default_rng(5), 200, digits=3)
  b = passkey(np.random.default_rng(5), 200, digits=3, min_len=None)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  with pytest.raises(DataError, match=r"passkey_min_len = 201 .* \[\d+, 200\]"):
    passkey(np.random.default_rng(0), 200, digits=3, min_len=201)
  with pytest.raises(DataError, match="passkey_min_len = 5"):
    make_task(DataConfig(source="passkey", seq_len=200, passkey_min_len=5), "passkey")
  with pytest.raises(ValueError, match="passkey_min_len.*set data.source or data.task"):
    DataConfig(source="corpus", seq_len=200, passkey_min_len=100)
  with pytest.raises(ValueError, match=r"passkey_min_len.*\[1, data.seq_len = 200\]"):
    DataConfig(source="corpus", task="passkey", task_fraction=0.5, seq_len=200,
               passkey_min_len=300)


def test_passkey_depth_ends():
  rng = np.random.default_rng(0)
  at_start = passkey(rng, 300, digits=5, depth=0.0).tokens
  assert bytes(at_start[1:18].astype(np.uint8)) == b" The pass key is "
  at_end = bytes(passkey(rng, 300, digits=5, depth=1.0).tokens[1:].astype(np.uint8))
  assert b"is the pass key.  What is the pass key?" in at_end


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), c=st.integers(1, 40), extra=st.integers(0, 100))
def test_selective_copy(seed, c, extra):
  seq_len = 2 * c + 1 + extra
  row = selective_copy(np.random.default_rng(seed), seq_len, copy_tokens=c)
  _basic(row, seq_len)
  check_selective_copy(row.tokens, row.answer_mask, c)
  assert verify_row("selective_copy", *row)


@pytest.mark.parametrize("task", ["mqar", "passkey", "selective_copy"])
def test_verify_row_rejects_wrong_answers_and_masks(task):
  cfg = DataConfig(source=task, seq_len=200)
  tokens, mask = make_task(cfg, task)(np.random.default_rng(1))
  assert verify_row(task, tokens, mask)
  i = int(np.flatnonzero(mask)[-1])
  wrong = tokens.copy()
  wrong[i] = ord("0") + (wrong[i] - ord("0") + 1) % 10 if task == "passkey" else \
      (130 if wrong[i] != 130 else 131) if task == "mqar" else ord("a") + (wrong[i] - 96) % 16
  assert not verify_row(task, wrong, mask)
  shifted = np.roll(mask, -1)
  assert not verify_row(task, tokens, shifted)


def test_rows_are_pure_functions_of_the_generator():
  cfg = DataConfig(source="mqar", seq_len=64)
  fn = make_task(cfg, "mqar")
  a, b = fn(np.random.default_rng(7)), fn(np.random.default_rng(7))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, fn(np.random.default_rng(8)).tokens)


@pytest.mark.parametrize("task,kw,minimum", [
    ("mqar", dict(num_pairs=8), 33),
    ("selective_copy", dict(copy_tokens=16), 33),
    ("passkey", dict(digits=5), 104),
])
def test_too_short_raises_with_minimum(task, kw, minimum):
  fn = {"mqar": mqar, "passkey": passkey, "selective_copy": selective_copy}[task]
  fn(np.random.default_rng(0), minimum, **kw)  # the minimum itself fits
  with pytest.raises(DataError, match=f"data.seq_len >= {minimum}"):
    fn(np.random.default_rng(0), minimum - 1, **kw)


def test_mqar_too_many_pairs():
  with pytest.raises(DataError, match="at most 128 pairs"):
    mqar(np.random.default_rng(0), 1000, num_pairs=129)
