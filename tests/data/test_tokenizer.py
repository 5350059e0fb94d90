"""ByteTokenizer: exact round trip for any str, specials skipped on decode."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memx.data import ByteTokenizer

TOK = ByteTokenizer()


def test_ids_and_vocab():
  assert TOK.vocab_size == 261
  assert (TOK.PAD, TOK.BOS, TOK.EOS, TOK.SEP, TOK.BLANK) == (256, 257, 258, 259, 260)
  ids = TOK.encode("hé")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [104, 0xC3, 0xA9])
  np.testing.assert_array_equal(TOK.encode("a", bos=True, eos=True), [TOK.BOS, 97, TOK.EOS])


# Every code point, lone surrogates included: the round trip is exact for any Python str.
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_round_trip_any_str(text):
  ids = TOK.encode(text)
  assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
  assert TOK.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(), st.lists(st.integers(256, 600), max_size=5))
def test_decode_skips_specials(text, specials):
  ids = TOK.encode(text).tolist()
  mixed = specials + ids[: len(ids) // 2] + specials + ids[len(ids) // 2:] + specials
  assert TOK.decode(mixed) == text
  assert TOK.decode(np.array(mixed, dtype=np.int64)) == text


def test_decode_replaces_invalid_bytes():
  assert TOK.decode([0xFF, 65, 0xE2, 0x82]) == "\ufffdA\ufffd"
  assert TOK.decode([]) == ""
