"""make_loader(): deterministic, stateless-in-the-step, per-host batches of token windows.

Batch k of a split is a pure function of (seed, split, k): LM rows are random windows of
seq_len + 1 tokens whose offsets come from `default_rng([seed, split_id, k, 0])`, drawn for the
whole global batch at once; task row r comes from `default_rng([seed, split_id, k, 1, r])`. A
process materialises only its rows, so every process count and mesh layout sees the same global
batch, and the iterator's whole state is {"step": k}: resuming is exact and free.
"""

import dataclasses
import hashlib
import math
import pathlib
import pickle
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jaxtyping import Int

from memx.data.config import BYTE_EOS, DataConfig
from memx.data.corpus import load_corpus
from memx.data.documents import document_layout
from memx.data.tasks import TaskRow, make_task, task_settings
from memx.data.tokenizer import ByteTokenizer
from memx.errors import DataError

SPLITS = {"train": 0, "eval": 1}
# Bump when the way bytes become a token stream changes (e.g. the EOS between text files), so
# old and new data hashes never collide.
_FORMAT = "memx-data-v1"
_HASH_CHUNK = 1 << 24


class _TokenStream:
  """A virtual concatenation of 1-D integer arrays; memory-mapped pieces stay on disk."""

  def __init__(self, pieces: list[np.ndarray]):
    self.pieces = [p for p in pieces if len(p)]
    self._ends = np.cumsum([len(p) for p in self.pieces], dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def window(self, start: int, length: int) -> Int[np.ndarray, " L"]:
    """Tokens [start, start + length) as int32, crossing piece boundaries as needed."""
    out = np.empty(length, dtype=np.int32)
    i = int(np.searchsorted(self._ends, start, side="right"))
    filled = 0
    while filled < length:
      piece = self.pieces[i]
      a = start + filled - (int(self._ends[i]) - len(piece))
      take = min(length - filled, len(piece) - a)
      out[filled:filled + take] = piece[a:a + take]
      filled += take
      i += 1
    return out


@dataclasses.dataclass(frozen=True)
class _Source:
  stream: _TokenStream
  description: str
  files: tuple[dict[str, str], ...]  # {"path", "sha256"} per file, for provenance
  digest: str  # sha256 over the source's bytes, in order


def _file_error(cfg: DataConfig, i: int, what: str, allowed: str) -> DataError:
  return DataError(f"data.paths[{i}] = {cfg.paths[i]!r} {what}. data.source = {cfg.source!r} "
                   f"expects {allowed}.")


_TEXT_ALLOWED = "readable UTF-8 text files, tokenized as bytes"
_NPY_ALLOWED = ("readable .npy files (numpy.save) each holding one 1-D integer array of token "
                "ids in [0, vocab_size)")


def _read_bytes(cfg: DataConfig, i: int, allowed: str) -> bytes:
  path = pathlib.Path(cfg.paths[i])
  if not path.exists():
    raise _file_error(cfg, i, "does not exist", allowed)
  if not path.is_file():
    raise _file_error(cfg, i, "is not a regular file", allowed)
  try:
    return path.read_bytes()
  except OSError as e:
    raise _file_error(cfg, i, f"cannot be read ({e.strerror or e})", allowed) from e


def _file_sha256(cfg: DataConfig, i: int, allowed: str) -> str:
  h = hashlib.sha256()
  try:
    with open(cfg.paths[i], "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
  except OSError as e:
    raise _file_error(cfg, i, f"cannot be read ({e.strerror or e})", allowed) from e
  return h.hexdigest()


def _documents(data: bytes, separator: str | None) -> list[np.ndarray]:
  """data's documents as byte tokens with an EOS between them: split at `separator` (None:
  one document), empty documents dropped."""
  docs = [data] if separator is None else data.split(separator.encode())
  eos = np.array([ByteTokenizer.EOS], dtype=np.int32)
  pieces = []
  for doc in (d for d in docs if d):
    if pieces:
      pieces.append(eos)
    pieces.append(np.frombuffer(doc, dtype=np.uint8))
  return pieces


def _corpus_source(cfg: DataConfig) -> _Source:
  data, digest = load_corpus()
  return _Source(_TokenStream(_documents(data, cfg.text_separator)),
                 f"the embedded corpus ({len(data)} bytes)", (), digest)


def _text_source(cfg: DataConfig) -> _Source:
  pieces, files, h = [], [], hashlib.sha256()
  eos = np.array([ByteTokenizer.EOS], dtype=np.int32)
  for i, path in enumerate(cfg.paths):
    data = _read_bytes(cfg, i, _TEXT_ALLOWED)
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _file_error(cfg, i, f"is not valid UTF-8 (byte {e.start}: {e.reason})",
                        _TEXT_ALLOWED) from e
    if i:
      pieces.append(eos)  # documents are separated by EOS, so a window can see the boundary
    pieces += _documents(data, cfg.text_separator)
    digest = hashlib.sha256(data).hexdigest()
    files.append({"path": str(path), "sha256": digest})
    h.update(digest.encode())
  stream = _TokenStream(pieces)
  return _Source(stream, f"{len(cfg.paths)} text file(s) ({len(stream)} tokens)", tuple(files),
                 h.hexdigest())


def _npy_source(cfg: DataConfig, vocab_size: int) -> _Source:
  pieces, files, h = [], [], hashlib.sha256()
  for i, path in enumerate(cfg.paths):
    p = pathlib.Path(path)
    if not p.exists():
      raise _file_error(cfg, i, "does not exist", _NPY_ALLOWED)
    if not p.is_file():
      raise _file_error(cfg, i, "is not a regular file", _NPY_ALLOWED)
    try:
      arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
      raise _file_error(cfg, i, f"is not a valid .npy file ({e})", _NPY_ALLOWED) from e
    if not isinstance(arr, np.ndarray):  # an .npz archive
      arr.close()
      raise _file_error(cfg, i, "is an .npz archive, not a .npy array", _NPY_ALLOWED)
    if arr.dtype.kind not in "iu":
      raise _file_error(cfg, i, f"holds dtype {arr.dtype}, not an integer dtype", _NPY_ALLOWED)
    if arr.ndim != 1:
      raise _file_error(cfg, i, f"holds an array of shape {arr.shape}, not a 1-D one",
                        _NPY_ALLOWED)
    if arr.size:
      lo, hi = int(arr.min()), int(arr.max())
      if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = int(np.flatnonzero(arr == bad)[0])
        raise _file_error(
            cfg, i, f"holds token id {bad} (first at index {where}), outside [0, {vocab_size}); "
            "set data.vocab_size to the id space of the tokenizer that wrote it", _NPY_ALLOWED)
    pieces.append(arr)
    digest = _file_sha256(cfg, i, _NPY_ALLOWED)
    files.append({"path": str(path), "sha256": digest})
    h.update(digest.encode())
  stream = _TokenStream(pieces)
  return _Source(stream, f"{len(cfg.paths)} .npy file(s) ({len(stream)} tokens)", tuple(files),
                 h.hexdigest())


def _row_ranges(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[range]:
  """The batch rows this process's devices hold, as sorted disjoint ranges."""
  spans = set()
  for idx in sharding.addressable_devices_indices_map(shape).values():
    s = idx[0] if idx else slice(None)
    start, stop, _ = s.indices(shape[0])
    spans.add((start, stop))
  merged: list[list[int]] = []
  for start, stop in sorted(spans):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], stop)
    else:
      merged.append([start, stop])
  return [range(a, b) for a, b in merged]


class Loader:
  """Batches of one split; build it with `make_loader`.

  Attributes:
    vocab_size: the token id space (the byte tokenizer's, or data.vocab_size for "npy").
    data_hash: sha256 hex over the source's bytes (files in order, or the corpus) and the task
      settings; record it in run provenance.
    provenance: JSON-serialisable description of the source (files and their sha256, corpus
      digest, task settings, token counts, data_hash).
    seq_len, batch_size: T and the global batch B.
    local_batch_size: rows this process materialises in `local_batch` (B / process_count).
    num_task_rows: rows of each global batch that come from the task (the last ones).
    step: the next batch `__next__` yields.
  """

  def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, split: str,
               process_index: int, process_count: int, vocab_size: int,
               source: _Source | None, task_fn: Callable[[np.random.Generator], TaskRow] | None,
               num_task_rows: int, data_hash: str, provenance: dict):
    self.cfg = cfg
    self.seq_len = cfg.seq_len
    self.batch_size = batch_size
    self.seed = seed
    self.split = split
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = batch_size // process_count
    self.vocab_size = vocab_size
    self.num_task_rows = num_task_rows
    self.data_hash = data_hash
    self.provenance = provenance
    self.step = 0
    self._source = source
    self._task_fn = task_fn
    self._split_id = SPLITS[split]
    self._lm_bounds = (0, 0)
    if source is not None:
      n = len(source.stream)
      n_train = math.floor(n * (1.0 - cfg.eval_fraction))
      self._lm_bounds = (0, n_train) if split == "train" else (n_train, n)

  # -- batches ---------------------------------------------------------------------------------

  def _rows(self, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The given global rows of batch `step`, as `local_batch` describes."""
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    t1 = self.seq_len + 1
    n_lm = self.batch_size - self.num_task_rows
    tokens = np.empty((len(rows), t1), dtype=np.int32)
    answers = np.zeros((len(rows), t1), dtype=bool)
    is_task = rows >= n_lm
    if n_lm and not is_task.all():
      lo, hi = self._lm_bounds
      # One draw for the whole global batch: row r's window never depends on who reads it.
      offsets = np.random.default_rng([self.seed, self._split_id, step, 0]).integers(
          lo, hi - t1 + 1, size=n_lm)
      for i in np.flatnonzero(~is_task):
        tokens[i] = self._source.stream.window(int(offsets[rows[i]]), t1)
    for i in np.flatnonzero(is_task):
      rng = np.random.default_rng([self.seed, self._split_id, step, 1, int(rows[i])])
      tokens[i], answers[i] = self._task_fn(rng)
    answer_mask = np.ascontiguousarray(answers[:, 1:])
    weights = np.where(is_task[:, None], answer_mask, True).astype(np.float32)
    batch = {"inputs": np.ascontiguousarray(tokens[:, :-1]),
             "targets": np.ascontiguousarray(tokens[:, 1:]), "weights": weights,
             "answer_mask": answer_mask}
    if self.cfg.document_mask:
      eos = self.cfg.eos_id if self.cfg.source == "npy" else BYTE_EOS
      segment_ids, positions = document_layout(batch["inputs"], eos)
      segment_ids[is_task] = 0  # a task row is one document, whatever tokens it holds
      positions[is_task] = np.arange(self.seq_len, dtype=np.int32)
      batch |= {"segment_ids": segment_ids, "positions": positions}
    return batch

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`: rows [p*B/P, (p+1)*B/P).

    Args:
      step: the batch index (any non-negative int; batches are independent of each other).

    Returns:
      {"inputs": int32[b, T], "targets": int32[b, T] (inputs shifted by one),
       "weights": float32[b, T] (loss weights: 1 on LM rows, answer positions on task rows),
       "answer_mask": bool[b, T] (True where the target is a task answer; False on LM rows)},
      b = local_batch_size; with data.document_mask also "segment_ids" and "positions",
      int32[b, T] (memx.data.documents.document_layout).
    """
    b = self.local_batch_size
    return self._rows(step, np.arange(self.process_index * b, (self.process_index + 1) * b))

  def global_batch(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Global batch `step` as jax.Arrays laid out by `sharding`, built from local rows only.

    The rows materialised are exactly those the sharding places on this process's devices
    (whatever the mesh's device order), so the global array equals the single-process batch.
    Uses `jax.make_array_from_process_local_data`.

    Args:
      step: the batch index.
      sharding: a sharding of the [B, T] arrays, typically NamedSharding(mesh, P(data_axes)).

    Returns:
      The keys of `local_batch`, each a global [B, T] jax.Array.

    Raises:
      DataError: the sharding cannot split batch_size evenly.
    """
    shape = (self.batch_size, self.seq_len)
    try:
      sharding.shard_shape(shape)
    except ValueError as e:
      raise DataError(f"batch_size = {self.batch_size} (x seq_len {self.seq_len}) cannot be split "
                      f"by the sharding {sharding} ({e}); the batch must be divisible by the "
                      "number of shards of the mesh's batch axes.") from e
    rows = np.concatenate([np.arange(r.start, r.stop) for r in _row_ranges(sharding, shape)])
    local = self._rows(step, rows)
    return {k: jax.make_array_from_process_local_data(sharding, v, shape)
            for k, v in local.items()}

  # -- iterator and state ----------------------------------------------------------------------

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.local_batch(self.step)
    self.step += 1
    return batch

  def state(self) -> dict:
    """The iterator state, JSON-serialisable: {"step": k} (k = the next batch)."""
    return {"step": self.step}

  def restore(self, state: dict) -> None:
    """Resumes from `state()`'s output; the next batch is then exactly batch state["step"]."""
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise DataError(f"data-iterator state {state!r} is not valid: expected a dict "
                      '{"step": k} with k a non-negative integer, as Loader.state() returns.')
    self.step = step


def check_training_mix(cfg: DataConfig, batch_size: int) -> None:
  """DataError when a non-zero task_fraction gives no task row in a training batch: the run
  would never see the task (and still report its accuracy). Training entry points call it;
  loaders for calibration or evaluation may well hold no task rows."""
  task = cfg.task_name
  if task is None or cfg.source == task or cfg.task_fraction == 0:
    return
  if round(cfg.task_fraction * batch_size) == 0:
    raise DataError(
        f"data.task_fraction = {cfg.task_fraction} of batch_size {batch_size} rounds to 0 task "
        f"rows: training would never see the {task!r} task (and still report its accuracy). "
        f"Use a task_fraction that gives at least 1 row (Python's round: above "
        f"{0.5 / batch_size:.3g}), or task_fraction = 0 for no task rows in training.")


def make_loader(cfg: DataConfig, *, batch_size: int, seed: int, split: str = "train",
                process_index: int | None = None, process_count: int | None = None) -> Loader:
  """Builds the loader of one split of cfg's data.

  Sources: "corpus" (embedded text), "text" (UTF-8 files; an EOS separates files), "npy"
  (pre-tokenized 1-D integer files, memory-mapped), or a task name (every row from the task).
  LM rows are uniform random windows of seq_len + 1 tokens within the split: "train" is the
  first (1 - eval_fraction) of the token stream, "eval" the rest, so their windows never
  overlap. With cfg.task set, the last round(task_fraction * batch_size) rows of every global
  batch (Python's round: half to even) are task rows.

  Args:
    cfg: the data config.
    batch_size: global batch size B (rows across all processes).
    seed: data seed (>= 0); batches are a pure function of (seed, split, step).
    split: "train" or "eval". Task rows of the two splits come from disjoint random streams.
    process_index, process_count: this process and the number of processes (default: JAX's).
      Process p's `local_batch` holds rows [p*B/P, (p+1)*B/P).

  Returns:
    A Loader at step 0.

  Raises:
    DataError: a file is missing, unreadable or malformed; the split is shorter than
      seq_len + 1 tokens; seq_len is too short for the task; batch_size is not divisible by
      process_count; or the seed/split/process arguments are invalid.
  """
  if split not in SPLITS:
    raise DataError(f"split = {split!r} is not allowed: expected one of {sorted(SPLITS)}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"batch_size = {batch_size!r} is not allowed: must be a positive integer.")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise DataError(f"seed = {seed!r} is not allowed: the data seed must be an integer >= 0.")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index = {process_index}, process_count = {process_count} are not "
                    "allowed: need process_count >= 1 and 0 <= process_index < process_count.")
  if batch_size % process_count:
    raise DataError(
        f"batch_size = {batch_size} is not divisible by the number of processes "
        f"({process_count}); every process loads an equal share of the global batch, so the "
        f"batch size must be a multiple of {process_count}.")

  tokenizer = ByteTokenizer()
  vocab_size = cfg.vocab_size or tokenizer.vocab_size
  task = cfg.task_name
  num_task_rows = batch_size if cfg.source == task else round(cfg.task_fraction * batch_size)

  task_fn, settings = None, "none"
  filler_corpus = task == "passkey" and cfg.passkey_filler == "corpus"
  if task is not None:
    filler = None
    if filler_corpus:
      # The split's own part of the corpus (as the LM windows below): train rows never show
      # held-out text, even as haystack.
      corpus = load_corpus()[0]
      cut = math.floor(len(corpus) * (1.0 - cfg.eval_fraction))
      filler = corpus[:cut] if split == "train" else corpus[cut:]
    task_fn = make_task(cfg, task, filler=filler)
    settings = f"{task_settings(cfg, task)};fraction={num_task_rows}/{batch_size}"
    if filler_corpus:  # the haystack's bytes are data too
      settings += f";filler_sha256={load_corpus()[1]};filler_split={cfg.eval_fraction}"

  source = None
  if cfg.source == "corpus":
    source = _corpus_source(cfg)
  elif cfg.source == "text":
    source = _text_source(cfg)
  elif cfg.source == "npy":
    source = _npy_source(cfg, vocab_size)

  if source is not None and num_task_rows < batch_size:
    n = len(source.stream)
    n_train = math.floor(n * (1.0 - cfg.eval_fraction))
    n_split = n_train if split == "train" else n - n_train
    if n_split < cfg.seq_len + 1:
      part = (f"the first {1 - cfg.eval_fraction:.0%}" if split == "train"
              else f"the last {cfg.eval_fraction:.0%}")
      raise DataError(
          f"sequence longer than the data: data.seq_len = {cfg.seq_len} needs windows of "
          f"{cfg.seq_len + 1} tokens, but the {split!r} split of {source.description} holds only "
          f"{n_split} tokens ({part} of {n}). Use a shorter data.seq_len or more data"
          + (", or raise data.eval_fraction." if split == "eval" else "."))

  if cfg.document_mask and source is not None and split == "train" and num_task_rows < batch_size:
    eos = cfg.eos_id if cfg.source == "npy" else BYTE_EOS
    if not any((piece == eos).any() for piece in source.stream.pieces):
      how = {"npy": f"data.eos_id = {eos} never occurs in the files",
             "text": "each text file is one document and there is one file (set "
                     "data.text_separator to split documents inside it)",
             "corpus": f"data.text_separator = {cfg.text_separator!r} never occurs in it"}
      raise DataError(
          f"data.document_mask = true, but {source.description} holds no document boundary: "
          f"{how[cfg.source]}. Every row would be one document, as without the mask.")

  h = hashlib.sha256()
  h.update(f"{_FORMAT}\nsource={cfg.source}\n".encode())
  if source is not None:
    h.update(f"bytes={source.digest}\n".encode())
  h.update(f"task={settings}\n".encode())
  if cfg.text_separator is not None:  # (None keeps the hashes of earlier runs)
    h.update(f"text_separator={cfg.text_separator!r}\n".encode())
  data_hash = h.hexdigest()
  provenance = {
      "source": cfg.source,
      "files": [dict(f) for f in source.files] if source else [],
      "corpus_sha256": load_corpus()[1] if cfg.source == "corpus" or filler_corpus else None,
      "tokens": len(source.stream) if source else None,
      "task": settings,
      "vocab_size": vocab_size,
      "data_hash": data_hash,
  }
  return Loader(cfg, batch_size=batch_size, seed=seed, split=split, process_index=process_index,
                process_count=process_count, vocab_size=vocab_size, source=source,
                task_fn=task_fn, num_task_rows=num_task_rows, data_hash=data_hash,
                provenance=provenance)


__all__ = ["Loader", "make_loader"]
