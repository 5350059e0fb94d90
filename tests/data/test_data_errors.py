"""Every bad input raises DataError (or ConfigError) whose message says what and what is allowed."""

import numpy as np
import pytest

from memx.data import DataConfig, make_loader
from memx.errors import ConfigError, DataError


def _load(**kw):
  batch_size = kw.pop("batch_size", 4)
  split = kw.pop("split", "train")
  return make_loader(DataConfig(**kw), batch_size=batch_size, seed=0, split=split)


def test_missing_text_file(tmp_path):
  path = str(tmp_path / "nope.txt")
  with pytest.raises(DataError, match="nope.txt' does not exist.*UTF-8 text"):
    _load(source="text", paths=(path,))


def test_missing_npy_file(tmp_path):
  path = str(tmp_path / "nope.npy")
  with pytest.raises(DataError, match=r"data.paths\[0\] = .*nope.npy' does not exist.*\.npy"):
    _load(source="npy", paths=(path,))


def test_directory_instead_of_file(tmp_path):
  with pytest.raises(DataError, match="is not a regular file"):
    _load(source="text", paths=(str(tmp_path),))


@pytest.mark.parametrize("content", [b"hello, not numpy", b"\x93NUMPY\x01\x00garbage", b""])
def test_corrupt_npy(tmp_path, content):
  path = tmp_path / "bad.npy"
  path.write_bytes(content)
  with pytest.raises(DataError, match="bad.npy' is not a valid .npy file"):
    _load(source="npy", paths=(str(path),))


def test_truncated_npy(tmp_path):
  path = tmp_path / "cut.npy"
  np.save(path, np.arange(1000))
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(DataError, match="cut.npy' is not a valid .npy file"):
    _load(source="npy", paths=(str(path),))


def test_float_npy(tmp_path):
  path = tmp_path / "f.npy"
  np.save(path, np.ones(100, np.float32))
  with pytest.raises(DataError, match="f.npy' holds dtype float32, not an integer dtype"):
    _load(source="npy", paths=(str(path),))


def test_2d_npy(tmp_path):
  path = tmp_path / "m.npy"
  np.save(path, np.ones((10, 10), np.int32))
  with pytest.raises(DataError, match=r"m.npy' holds an array of shape \(10, 10\), not a 1-D"):
    _load(source="npy", paths=(str(path),))


def test_npz_archive(tmp_path):
  path = tmp_path / "z.npy"
  with open(path, "wb") as f:
    np.savez(f, a=np.arange(10))
  with pytest.raises(DataError, match="z.npy' is an .npz archive"):
    _load(source="npy", paths=(str(path),))


@pytest.mark.parametrize("bad,vocab", [(261, None), (-1, None), (1000, 1000)])
def test_npy_ids_out_of_range(tmp_path, bad, vocab):
  path = tmp_path / "ids.npy"
  ids = np.arange(200, dtype=np.int32) % 100
  ids[17] = bad
  np.save(path, ids)
  limit = vocab or 261
  with pytest.raises(DataError, match=rf"ids.npy' holds token id {bad} \(first at index 17\), "
                                      rf"outside \[0, {limit}\)"):
    _load(source="npy", paths=(str(path),), vocab_size=vocab)


def test_invalid_utf8_text(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("caf\xe9 au lait".encode("latin-1"))
  with pytest.raises(DataError, match="latin1.txt' is not valid UTF-8 \\(byte 3"):
    _load(source="text", paths=(str(path),))


def test_text_shorter_than_seq_len(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("x" * 100)
  with pytest.raises(DataError, match="sequence longer than the data: data.seq_len = 128 needs "
                                      "windows of 129 tokens.*'train' split.*holds only 95"):
    _load(source="text", paths=(str(path),), seq_len=128)


def test_eval_split_shorter_than_seq_len(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("x" * 1000)
  _load(source="text", paths=(str(path),), seq_len=128)  # train (950 tokens) is fine
  with pytest.raises(DataError, match="'eval' split.*holds only 50.*eval_fraction"):
    _load(source="text", paths=(str(path),), seq_len=128, split="eval")


def test_batch_not_divisible_by_hosts():
  with pytest.raises(DataError, match="batch_size = 6 is not divisible by the number of "
                                      "processes \\(4\\)"):
    make_loader(DataConfig(), batch_size=6, seed=0, process_index=0, process_count=4)


@pytest.mark.parametrize("kw", [dict(process_index=2, process_count=2),
                                dict(process_index=0, process_count=0)])
def test_bad_process_arguments(kw):
  with pytest.raises(DataError, match="process_index"):
    make_loader(DataConfig(), batch_size=4, seed=0, **kw)


@pytest.mark.parametrize("task,kw,minimum", [
    ("mqar", dict(mqar_pairs=8), 33),
    ("passkey", dict(passkey_digits=5), 104),
    ("selective_copy", dict(copy_tokens=16), 33),
])
def test_task_seq_len_too_short(task, kw, minimum):
  with pytest.raises(DataError, match=f"too short for the '{task}' task.*seq_len >= {minimum}"):
    _load(source=task, seq_len=minimum - 1, **kw)
  with pytest.raises(DataError, match=f"seq_len >= {minimum}"):
    _load(source="corpus", task=task, task_fraction=0.5, seq_len=minimum - 1, **kw)


def test_bad_split_seed_batch_and_state():
  with pytest.raises(DataError, match="split = 'test'.*'eval', 'train'"):
    make_loader(DataConfig(), batch_size=4, seed=0, split="test")
  with pytest.raises(DataError, match="seed = -1"):
    make_loader(DataConfig(), batch_size=4, seed=-1)
  with pytest.raises(DataError, match="batch_size = 0"):
    make_loader(DataConfig(), batch_size=0, seed=0)
  loader = make_loader(DataConfig(), batch_size=4, seed=0)
  with pytest.raises(DataError, match="not valid.*non-negative"):
    loader.restore({"step": -3})
  with pytest.raises(DataError, match="not valid"):
    loader.restore({"position": 3})


def test_config_rejects_bad_data_fields():
  with pytest.raises(ConfigError, match="data.vocab_size = 100.*>= 261"):
    DataConfig(source="corpus", vocab_size=100)
  with pytest.raises(ConfigError, match="data.vocab_size = 100.*>= 261"):
    DataConfig(source="npy", paths=("x.npy",), vocab_size=100, task="mqar", task_fraction=0.5)
  with pytest.raises(ConfigError, match="data.vocab_size = 0"):
    DataConfig(source="npy", paths=("x.npy",), vocab_size=0)
  DataConfig(source="npy", paths=("x.npy",), vocab_size=100)
  with pytest.raises(ConfigError, match="data.passkey_filler = 'lorem'"):
    DataConfig(source="passkey", passkey_filler="lorem")
