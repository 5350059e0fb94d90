"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO


@functools.cache
def _umask() -> int:
  """The process umask, read without changing it (os.umask sets it, which would race with
  other threads creating files): Linux reports it in /proc; elsewhere the common 022."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  return 0o022


@contextlib.contextmanager
def atomic_file(path: str | pathlib.Path, mode: str = "w") -> Iterator[IO]:
  """Yields a temporary file beside `path` that replaces `path` when the block succeeds; on an
  exception the temporary file is deleted and `path` is left as it was.

  The file gets the permissions a plain open() would give it (0666 less the umask: readable by
  the group, unlike the 0600 of a temporary file) and is fsynced before the rename, so a crash
  cannot leave an empty file under the final name."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"{path} is a directory; give a file path to write to.")
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.",
                                   suffix=".tmp", delete=False) as f:
    tmp = pathlib.Path(f.name)
    try:
      os.fchmod(f.fileno(), 0o666 & ~_umask())
      yield f
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      f.close()
      tmp.unlink(missing_ok=True)
      raise
  try:
    tmp.replace(path)
  except BaseException:  # e.g. path is a directory: leave nothing behind
    tmp.unlink(missing_ok=True)
    raise


def write_json(path: str | pathlib.Path, obj, *, indent: int = 2) -> None:
  """`obj` as JSON at `path`, atomically (others read these files while a run writes them)."""
  with atomic_file(path) as f:
    json.dump(obj, f, indent=indent, default=str)
