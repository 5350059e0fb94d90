"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import json
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | pathlib.Path, mode: str = "w") -> Iterator[IO]:
  """Yields a temporary file beside `path` that replaces `path` when the block succeeds; on an
  exception the temporary file is deleted and `path` is left as it was."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.",
                                   suffix=".tmp", delete=False) as f:
    tmp = pathlib.Path(f.name)
    try:
      yield f
    except BaseException:
      f.close()
      tmp.unlink(missing_ok=True)
      raise
  tmp.replace(path)


def write_json(path: str | pathlib.Path, obj, *, indent: int = 2) -> None:
  """`obj` as JSON at `path`, atomically (others read these files while a run writes them)."""
  with atomic_file(path) as f:
    json.dump(obj, f, indent=indent, default=str)
