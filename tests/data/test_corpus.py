"""The embedded corpus: stable bytes and hash, non-trivial English text."""

import hashlib

from memx.data import load_corpus


def test_corpus_hash_matches_bytes_and_is_cached():
  data, digest = load_corpus()
  assert digest == hashlib.sha256(data).hexdigest()
  assert load_corpus() == (data, digest)


def test_corpus_is_deterministic_sorted_topics():
  from pydoc_data.topics import topics

  data, _ = load_corpus()
  # Independent rebuild: sorted keys; the first topic's text starts the corpus.
  first = topics[sorted(topics)[0]].strip()
  assert data.startswith(first.encode())


def test_corpus_is_nontrivial_english():
  data, _ = load_corpus()
  text = data.decode("utf-8")
  assert len(data) > 200_000
  words = text.split()
  assert len(words) > 30_000
  for common in ("the", "of", "is", "statement", "function"):
    assert common in words
  assert sum(c.isascii() for c in text) / len(text) > 0.99
