"""The embedded default corpus: English text that ships with CPython, so no download is needed."""

import functools
import hashlib

from memx.errors import DataError


@functools.cache
def load_corpus() -> tuple[bytes, str]:
  """Returns the embedded corpus as UTF-8 bytes and their sha256 hex digest.

  The text is CPython's own documentation of the language's statements and operators,
  `pydoc_data.topics.topics` (the pages `help("if")` shows): about 0.5 MB of English prose and
  code. Topics are joined in sorted key order so the bytes do not depend on dict order. They do
  depend on the Python version, which is why the digest goes into every run's provenance.

  Returns:
    (bytes, sha256 hex digest of the bytes). Cached: later calls return the same objects.

  Raises:
    DataError: this Python was installed without `pydoc_data` (some minimal distro builds).
  """
  try:
    from pydoc_data.topics import topics
  except ImportError as e:
    raise DataError(
        "data.source = 'corpus' uses the English text bundled with CPython "
        "(pydoc_data.topics), but this Python installation lacks it (" + str(e) + "). Install "
        "the full standard library (e.g. the python3.12 package rather than python3.12-minimal) "
        "or use data.source = 'text' with your own UTF-8 files.") from e
  text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
  data = text.encode("utf-8")
  return data, hashlib.sha256(data).hexdigest()
