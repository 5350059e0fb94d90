"""data.document_mask: segment ids and positions from end-of-document tokens, in the loader."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memx.data import ByteTokenizer, DataConfig, document_layout, make_loader, model_kwargs
from memx.data.config import BYTE_EOS
from memx.errors import ConfigError, DataError


def _layout_by_loop(row, eos):
  """One row, token by token: a separator opens a new document at position 0."""
  seg, pos, s, p = [], [], 0, 0
  for i, tok in enumerate(row):
    if tok == eos:
      s, p = s + 1, 0
    elif i:
      p += 1
    seg.append(s)
    pos.append(p)
  return np.array(seg), np.array(pos)


def test_layout_equals_a_token_loop():
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 4, (64, 23))  # token 3 is the separator: ~25% of tokens, runs of them
  rows[0, 0], rows[1, -1], rows[2] = 3, 3, 0  # at the start, at the end, none
  seg, pos = document_layout(rows, 3)
  assert seg.dtype == pos.dtype == np.int32
  for r, row in enumerate(rows):
    want_seg, want_pos = _layout_by_loop(row, 3)
    np.testing.assert_array_equal(seg[r], want_seg)
    np.testing.assert_array_equal(pos[r], want_pos)
  np.testing.assert_array_equal(pos[2], np.arange(23))
  assert (seg[2] == 0).all()


def test_byte_eos_is_the_tokenizers():
  assert BYTE_EOS == ByteTokenizer.EOS


def _docs(tmp_path, lengths):
  rng = np.random.default_rng(1)
  paths = []
  for i, n in enumerate(lengths):
    paths.append(str(tmp_path / f"doc{i}.txt"))
    with open(paths[-1], "w") as f:
      f.write("".join(rng.choice(list("abcdefgh"), n)))
  return tuple(paths)


def test_text_rows_carry_their_documents(tmp_path):
  paths = _docs(tmp_path, [30, 9, 50, 17, 44, 25, 60])
  plain = DataConfig(source="text", paths=paths, seq_len=24, eval_fraction=0.2)
  masked = DataConfig(source="text", paths=paths, seq_len=24, eval_fraction=0.2,
                      document_mask=True, task="mqar", task_fraction=0.25, mqar_pairs=2)
  b0 = make_loader(plain, batch_size=8, seed=5).local_batch(3)
  b = make_loader(masked, batch_size=8, seed=5).local_batch(3)
  assert "segment_ids" not in b0 and model_kwargs(b0) == {}
  lm = slice(0, 6)  # the last 2 rows are MQAR rows
  np.testing.assert_array_equal(b["inputs"][lm], b0["inputs"][lm])  # same windows
  crossings = 0
  for r in range(6):
    seg, pos = _layout_by_loop(b["inputs"][r], ByteTokenizer.EOS)
    np.testing.assert_array_equal(b["segment_ids"][r], seg)
    np.testing.assert_array_equal(b["positions"][r], pos)
    crossings += seg[-1] > 0
  assert crossings  # documents of 9..60 bytes: windows of 24 cross boundaries
  for r in (6, 7):  # a task row is one document (its BOS/SEP tokens are not separators)
    assert (b["segment_ids"][r] == 0).all()
    np.testing.assert_array_equal(b["positions"][r], np.arange(24))
  assert set(model_kwargs(b)) == {"positions", "segment_ids"}


def test_npy_separator_and_global_batch(tmp_path):
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, 1000, 4000)
  tokens[rng.integers(0, 4000, 150)] = 999
  path = str(tmp_path / "tok.npy")
  np.save(path, tokens)
  cfg = DataConfig(source="npy", paths=(path,), seq_len=32, vocab_size=1000, document_mask=True,
                   eos_id=999)
  loader = make_loader(cfg, batch_size=8, seed=0)
  local = loader.local_batch(2)
  seg, pos = document_layout(local["inputs"], 999)
  np.testing.assert_array_equal(local["segment_ids"], seg)
  np.testing.assert_array_equal(local["positions"], pos)
  assert seg.max() > 0
  if jax.device_count() >= 8:
    mesh = Mesh(np.asarray(jax.devices()[:8])[::-1].reshape(4, 2), ("data", "seq"))
    glob = loader.global_batch(2, NamedSharding(mesh, P("data", "seq")))
    for k in ("segment_ids", "positions"):
      np.testing.assert_array_equal(np.asarray(glob[k]), local[k])


@pytest.mark.parametrize("kw, match", [
    (dict(document_mask=True), "data.document_mask = True.*corpus is one text.*text_separator"),
    (dict(source="npy", paths=("x.npy",), document_mask=True), "data.eos_id = None.*end-of-doc"),
    (dict(source="npy", paths=("x.npy",), eos_id=3), "data.eos_id = 3.*set both"),
    (dict(source="text", paths=("x.txt",), document_mask=True, eos_id=3), "text files use.*258"),
    (dict(source="npy", paths=("x.npy",), vocab_size=100, document_mask=True, eos_id=100),
     r"data.eos_id = 100.*\[0, data.vocab_size = 100\)"),
    (dict(source="text", paths=("x.txt",), document_mask=1), "must be true or false"),
])
def test_config_refuses_documents_it_cannot_find(kw, match):
  with pytest.raises(ConfigError, match=match):
    DataConfig(**kw)


def test_task_only_rows_keep_the_batch_structure():
  """A run's task-only evaluation (DataConfig.task_only) gives batches with the same keys as
  its training rows: one compiled eval step serves both."""
  cfg = DataConfig(source="npy", paths=("x.npy",), document_mask=True, eos_id=7, task="mqar",
                   task_fraction=0.5, mqar_pairs=2)
  task = cfg.task_only()
  assert (task.source, task.document_mask, task.eos_id) == ("mqar", True, None)
  b = make_loader(task, batch_size=2, seed=0).local_batch(0)
  assert (b["segment_ids"] == 0).all()
  np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(128), (2, 128)))


def test_text_separator_splits_documents_inside_files(tmp_path):
  (tmp_path / "a.txt").write_text("aa<|endoftext|>bbb<|endoftext|><|endoftext|>c<|endoftext|>")
  (tmp_path / "b.txt").write_text("dd")
  paths = (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
  split = DataConfig(source="text", paths=paths, seq_len=8, eval_fraction=0.1,
                     text_separator="<|endoftext|>", document_mask=True)
  loader = make_loader(split, batch_size=1, seed=0)
  stream = loader._source.stream
  eos = ByteTokenizer.EOS
  want = [97, 97, eos, 98, 98, 98, eos, 99, eos, 100, 100]  # empty documents leave no EOS
  np.testing.assert_array_equal(stream.window(0, len(stream)), want)
  whole = make_loader(DataConfig(source="text", paths=paths, seq_len=8, eval_fraction=0.1),
                      batch_size=1, seed=0)
  assert whole.data_hash != loader.data_hash and len(whole._source.stream) == 58 + 1 + 2
  with pytest.raises(ConfigError, match="data.text_separator = 'x' is not allowed.*'text'"):
    DataConfig(source="mqar", text_separator="x")
  with pytest.raises(ConfigError, match="non-empty string"):
    DataConfig(source="text", paths=paths, text_separator="")


def test_corpus_paragraphs_as_documents():
  cfg = DataConfig(seq_len=256, text_separator="\n\n", document_mask=True)
  loader = make_loader(cfg, batch_size=4, seed=0)
  b = loader.local_batch(0)
  assert (b["inputs"] == ByteTokenizer.EOS).any() and b["segment_ids"].max() > 0
  assert loader.data_hash != make_loader(DataConfig(seq_len=256), batch_size=4, seed=0).data_hash


def test_separator_runs_keep_their_task_evaluation():
  """A corpus split into paragraphs with a task mixed in: its task-only rows drop the
  separator (a task source reads no text), with or without document masks."""
  for mask in (False, True):
    cfg = DataConfig(seq_len=64, text_separator="\n\n", document_mask=mask, task="mqar",
                     task_fraction=0.5, mqar_pairs=2)
    task = cfg.task_only()
    assert (task.source, task.text_separator, task.document_mask) == ("mqar", None, mask)
    assert make_loader(task, batch_size=2, seed=0, split="eval").local_batch(0)["inputs"].shape


def test_document_mask_without_any_boundary_is_refused(tmp_path):
  (tmp_path / "one.txt").write_text("just one long document " * 20)
  with pytest.raises(DataError, match="1 text file.*no document boundary.*text_separator"):
    make_loader(DataConfig(source="text", paths=(str(tmp_path / "one.txt"),), seq_len=16,
                           document_mask=True), batch_size=2, seed=0)
  np.save(tmp_path / "t.npy", np.arange(500) % 7)
  with pytest.raises(DataError, match="data.eos_id = 9 never occurs"):
    make_loader(DataConfig(source="npy", paths=(str(tmp_path / "t.npy"),), seq_len=16,
                           vocab_size=10, document_mask=True, eos_id=9), batch_size=2, seed=0)
  with pytest.raises(DataError, match="text_separator = '@@' never occurs"):
    make_loader(DataConfig(text_separator="@@", document_mask=True), batch_size=2, seed=0)
