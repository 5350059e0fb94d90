"""make_loader: determinism, per-host rows, global arrays on 8 fake devices, mixing, splits."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memx.data import (
  ByteTokenizer,
  DataConfig,
  check_training_mix,
  load_corpus,
  make_loader,
  verify_row,
)
from memx.errors import DataError

KEYS = ("inputs", "targets", "weights", "answer_mask")


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in KEYS)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in KEYS}


def _arange_npy(tmp_path, n, parts=1):
  paths = []
  for i, chunk in enumerate(np.array_split(np.arange(n, dtype=np.int64), parts)):
    paths.append(str(tmp_path / f"tok{i}.npy"))
    np.save(paths[-1], chunk)
  return tuple(paths)


def test_batch_shapes_dtypes_and_shift():
  loader = make_loader(DataConfig(seq_len=32), batch_size=4, seed=0)
  b = loader.local_batch(0)
  assert b["inputs"].shape == b["targets"].shape == (4, 32)
  assert b["inputs"].dtype == b["targets"].dtype == np.int32
  assert b["weights"].dtype == np.float32 and b["answer_mask"].dtype == bool
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert (b["weights"] == 1).all() and not b["answer_mask"].any()
  assert loader.vocab_size == ByteTokenizer().vocab_size
  assert (loader.seq_len, loader.batch_size) == (32, 4)


def test_lm_rows_are_windows_of_the_corpus():
  corpus, digest = load_corpus()
  loader = make_loader(DataConfig(seq_len=64), batch_size=4, seed=3)
  b = loader.local_batch(5)
  for inp, tgt in zip(b["inputs"], b["targets"], strict=True):
    window = bytes(np.concatenate([inp, tgt[-1:]]).astype(np.uint8))
    assert window in corpus
  assert loader.provenance["corpus_sha256"] == digest


def test_determinism_and_variation():
  cfg = DataConfig(seq_len=48, task="mqar", task_fraction=0.5)
  a, b = make_loader(cfg, batch_size=8, seed=1), make_loader(cfg, batch_size=8, seed=1)
  assert _equal(a.local_batch(7), b.local_batch(7))
  assert _equal(a.local_batch(7), a.local_batch(7))
  assert not np.array_equal(a.local_batch(7)["inputs"], a.local_batch(8)["inputs"])
  other = make_loader(cfg, batch_size=8, seed=2)
  assert not np.array_equal(a.local_batch(7)["inputs"], other.local_batch(7)["inputs"])
  assert a.data_hash == other.data_hash and len(a.data_hash) == 64


def test_iterator_state_restore_is_exact():
  cfg = DataConfig(seq_len=16, task="selective_copy", task_fraction=0.25, copy_tokens=4)
  loader = make_loader(cfg, batch_size=4, seed=0)
  first = [next(loader) for _ in range(3)]
  assert loader.step == 3
  state = json.loads(json.dumps(loader.state()))
  assert state == {"step": 3}
  rest = [next(loader) for _ in range(2)]
  resumed = make_loader(cfg, batch_size=4, seed=0)
  resumed.restore(state)
  assert all(_equal(x, y) for x, y in zip(rest, [next(resumed), next(resumed)], strict=True))
  assert _equal(first[1], resumed.local_batch(1))


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("source,task", [("corpus", "passkey"), ("mqar", None)])
def test_hosts_concatenate_to_the_single_host_batch(count, source, task):
  cfg = DataConfig(source=source, seq_len=128, task=task, task_fraction=0.5 if task else 0.0)
  single = make_loader(cfg, batch_size=8, seed=4, process_index=0, process_count=1)
  hosts = [make_loader(cfg, batch_size=8, seed=4, process_index=p, process_count=count)
           for p in range(count)]
  assert all(h.local_batch_size == 8 // count for h in hosts)
  for step in (0, 9):
    assert _equal(_concat([h.local_batch(step) for h in hosts]), single.local_batch(step))


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape,axes,spec", [
    ((8,), ("data",), P("data")),
    ((4, 2), ("data", "model"), P("data")),  # replicated over "model"
    ((2, 4), ("data", "fsdp"), P(("data", "fsdp"))),
    ((4, 2), ("data", "seq"), P("data", "seq")),  # sequence parallel: T split too
])
@pytest.mark.parametrize("reverse", [False, True])  # device order must not change the rows
def test_global_batch_on_fake_devices(mesh_shape, axes, spec, reverse):
  devices = jax.devices()
  assert len(devices) == 8
  devices = devices[::-1] if reverse else devices
  mesh = Mesh(np.array(devices).reshape(mesh_shape), axes)
  sharding = NamedSharding(mesh, spec)
  cfg = DataConfig(seq_len=48, task="mqar", task_fraction=0.25)
  loader = make_loader(cfg, batch_size=16, seed=0)
  want = loader.local_batch(3)
  got = loader.global_batch(3, sharding)
  for k in KEYS:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
    assert got[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])


@pytest.mark.multidevice
def test_global_batch_rejects_indivisible_batch():
  from memx.errors import DataError

  mesh = Mesh(np.array(jax.devices()), ("data",))
  loader = make_loader(DataConfig(seq_len=16), batch_size=12, seed=0)
  with pytest.raises(DataError, match="batch_size = 12"):
    loader.global_batch(0, NamedSharding(mesh, P("data")))


def test_task_fraction_that_rounds_to_no_rows_is_refused():
  # 0.1 of 4 rows rounds to 0: training would never see the task yet report its accuracy.
  # (Training refuses it; a loader for calibration or evaluation may hold no task row.)
  for fraction, batch in ((0.1, 4), (0.25, 2), (0.5, 1)):
    cfg = DataConfig(seq_len=64, task="mqar", task_fraction=fraction, mqar_pairs=4)
    with pytest.raises(DataError, match="rounds to 0 task rows"):
      check_training_mix(cfg, batch)
    assert make_loader(cfg, batch_size=batch, seed=0).num_task_rows == 0
  check_training_mix(DataConfig(seq_len=64, task="mqar", task_fraction=0.25), 4)


def test_passkey_corpus_filler_comes_from_the_splits_own_text():
  # Train rows' haystacks must not show held-out (eval) text, nor eval rows' training text.
  corpus = load_corpus()[0]
  for split in ("train", "eval"):
    cfg = DataConfig(source="passkey", seq_len=256, passkey_filler="corpus", passkey_depth=1.0,
                     eval_fraction=0.1)
    cut = int(len(corpus) * 0.9)
    part = corpus[:cut] if split == "train" else corpus[cut:]
    rows = make_loader(cfg, batch_size=8, seed=0, split=split)
    for step in range(5):
      for row in rows.local_batch(step)["inputs"]:
        head = bytes(row[1:49].astype(np.uint8))  # after BOS: filler (the needle is last)
        assert head in part, (split, head)


@pytest.mark.parametrize("fraction,batch,n_task", [(0.25, 8, 2), (0.3, 10, 3), (1.0, 4, 4),
                                                   (0.5, 5, 2)])
def test_task_fraction_rows(fraction, batch, n_task):
  cfg = DataConfig(seq_len=64, task="mqar", task_fraction=fraction, mqar_pairs=4)
  loader = make_loader(cfg, batch_size=batch, seed=0)
  assert loader.num_task_rows == n_task == round(fraction * batch)
  b = loader.local_batch(2)
  is_task = b["answer_mask"].any(axis=1)
  np.testing.assert_array_equal(is_task, np.arange(batch) >= batch - n_task)
  assert (b["weights"][~is_task] == 1).all()
  np.testing.assert_array_equal(b["weights"][is_task], b["answer_mask"][is_task])
  assert (b["answer_mask"][is_task].sum(axis=1) == 4).all()
  for i in np.flatnonzero(is_task):
    row = np.concatenate([b["inputs"][i], b["targets"][i, -1:]])
    assert verify_row("mqar", row, np.concatenate([[False], b["answer_mask"][i]]))


@pytest.mark.parametrize("task", ["mqar", "passkey", "selective_copy"])
def test_task_source_rows_are_valid(task):
  cfg = DataConfig(source=task, seq_len=128, passkey_depth=0.5)
  b = make_loader(cfg, batch_size=4, seed=0).local_batch(0)
  assert b["answer_mask"].any(axis=1).all()
  np.testing.assert_array_equal(b["weights"], b["answer_mask"])
  for i in range(4):
    row = np.concatenate([b["inputs"][i], b["targets"][i, -1:]])
    assert verify_row(task, row, np.concatenate([[False], b["answer_mask"][i]]))


def test_eval_split_disjoint_from_train(tmp_path):
  n = 10_000
  cfg = DataConfig(source="npy", paths=_arange_npy(tmp_path, n, parts=3), seq_len=64,
                   vocab_size=n, eval_fraction=0.1)
  train = make_loader(cfg, batch_size=8, seed=0, split="train")
  evl = make_loader(cfg, batch_size=8, seed=0, split="eval")
  n_train = 9_000
  train_toks = np.concatenate([train.local_batch(s)["targets"] for s in range(50)])
  eval_toks = np.concatenate([evl.local_batch(s)["inputs"] for s in range(50)])
  assert train_toks.max() < n_train and eval_toks.min() >= n_train
  assert not np.array_equal(train.local_batch(0)["inputs"], evl.local_batch(0)["inputs"])
  # Windows crossing the boundaries of the three files are still contiguous.
  b = train.local_batch(1)
  np.testing.assert_array_equal(np.diff(b["inputs"], axis=1), 1)


def test_text_files_are_joined_with_eos(tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("é" * 20)
  b.write_text("z" * 30)
  cfg = DataConfig(source="text", paths=(str(a), str(b)), seq_len=8, eval_fraction=0.2)
  loader = make_loader(cfg, batch_size=64, seed=0)
  seen = set(np.unique(loader.local_batch(0)["inputs"]).tolist())
  assert ByteTokenizer.EOS in seen and ord("z") in seen and 0xC3 in seen
  assert loader.provenance["tokens"] == 40 + 1 + 30
  assert len(loader.provenance["files"]) == 2


def test_data_hash_tracks_bytes_and_task(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("hello world " * 50)
  cfg = DataConfig(source="text", paths=(str(p),), seq_len=16)
  h1 = make_loader(cfg, batch_size=2, seed=0).data_hash
  assert make_loader(cfg, batch_size=2, seed=5).data_hash == h1
  mixed = DataConfig(source="text", paths=(str(p),), seq_len=64, task="mqar", task_fraction=0.5)
  assert make_loader(mixed, batch_size=2, seed=0).data_hash != h1
  p.write_text("hello world " * 51)
  assert make_loader(cfg, batch_size=2, seed=0).data_hash != h1


def test_vocab_size_carries_to_task_only_eval(tmp_path):
  # The train loop evaluates a mixed-in task alone via dataclasses.replace(source=task, ...):
  # that config must stay valid and report the same id space as the LM loader.
  import dataclasses

  n = 5_000
  cfg = DataConfig(source="npy", paths=_arange_npy(tmp_path, n), seq_len=128, vocab_size=n,
                   task="passkey", task_fraction=0.5)
  lm = make_loader(cfg, batch_size=4, seed=0)
  task_only = dataclasses.replace(cfg, source="passkey", task=None, task_fraction=0.0)
  assert make_loader(task_only, batch_size=4, seed=0, split="eval").vocab_size == lm.vocab_size


def test_windows_stay_in_their_split_and_reach_both_ends(tmp_path):
  # Exact, not by chance: 40 tokens, eval_fraction 0.25 → train tokens 0..29 (window starts
  # 0..20, all of them drawn) and exactly one eval window, [30, 40).
  path = tmp_path / "t.npy"
  np.save(path, np.arange(40, dtype=np.int64))
  cfg = DataConfig(source="npy", paths=(str(path),), seq_len=9, vocab_size=40,
                   eval_fraction=0.25)
  ev = make_loader(cfg, batch_size=8, seed=0, split="eval")
  for step in range(20):
    b = ev.local_batch(step)
    np.testing.assert_array_equal(b["inputs"], np.tile(np.arange(30, 39), (8, 1)))
    np.testing.assert_array_equal(b["targets"], np.tile(np.arange(31, 40), (8, 1)))
  tr = make_loader(cfg, batch_size=8, seed=0, split="train")
  batches = [tr.local_batch(s) for s in range(40)]
  assert max(int(b["targets"].max()) for b in batches) <= 29
  assert {int(s) for b in batches for s in b["inputs"][:, 0]} == set(range(21))
