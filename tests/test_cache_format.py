"""Schema version 2: the spec lists its arrays with their roles, every chunk is written and carries a CRC-32C
checksum, and version-1 caches (made by stillroom 0.1, kept as a fixture) still read, with a warning."""

import json
import os
import zipfile

import numpy as np
import pytest
import zarr
from conftest import digits_cache

from shared.cache import LAYOUT, open_cache
from shared.errors import StillroomError
from student_train.train import FitConfig, fit
from teacher_cache.verify import verify_cache

V1_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "v1_digits_cache.zip")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers[:2], split="train[:200]", chunk_rows=64)


def test_spec_lists_every_array_with_its_role(cache_path):
  cache = open_cache(cache_path)
  roles = {layout.name: layout.role for layout in LAYOUT}
  listed = {array.name: array.role for array in cache.spec.arrays}
  assert set(listed) == set(cache.group.array_keys())  # The spec lists exactly what the store holds...
  assert listed == {name: roles[name] for name in listed}  # ...each with the catalogue's role.
  assert {"targets", "member_logits", "eval_member_logits", "shift", "chunk_committed"} <= set(listed)
  attrs = json.loads(open(os.path.join(cache_path, "zarr.json")).read())["attributes"]["stillroom"]
  assert [a["name"] for a in attrs["arrays"]] == [a.name for a in cache.spec.arrays]
  with pytest.raises(StillroomError, match="has no 'crop_box' array, which the crop views need"):
    cache.require(["targets", "crop_box"], "the crop views")


def _chunk_file(store, array, chunk):
  return os.path.join(store, array, "c", str(chunk), *["0"] * (zarr.open_array(os.path.join(store, array)).ndim - 1))


def test_every_chunk_is_written_with_a_checksum_and_damage_is_named(tmp_path, cache_path, data_dir):
  import shutil
  store = str(tmp_path / "c.zarr")
  shutil.copytree(cache_path, store)
  group = zarr.open_group(store, mode="r")
  for name in group.array_keys():
    codecs = [codec["name"] for codec in json.load(open(os.path.join(store, name, "zarr.json")))["codecs"]]
    assert codecs[-1] == "crc32c", (name, codecs)
    array = group[name]
    chunks = -(-array.shape[0] // array.chunks[0])
    assert all(os.path.exists(_chunk_file(store, name, k)) for k in range(chunks)), name
  # All-zero chunks are on disk too (zarr would skip them and read back zeros; the loop above found every file): no
  # view is flipped.
  assert not group["flip"][:].any()
  assert all(c.ok for c in verify_cache(store, data_dir=data_dir))

  os.remove(_chunk_file(store, "flip", 2))
  with open(_chunk_file(store, "targets", 1), "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0x01]))
  failed = {c.name: c.detail for c in verify_cache(store, data_dir=data_dir) if not c.ok}
  assert "flip: chunks 2 missing" in failed["every chunk present"]
  assert "targets chunk 1 (ValueError: Stored and computed checksum do not match" in failed["chunks intact (checksums)"]


def test_the_completion_record_binds_each_chunk_to_its_position_and_the_spec_to_the_store(tmp_path, cache_path):
  """The record lists, for every array but the bookkeeping ones, each chunk's CRC-32C as its file stores it (the last 4
  bytes, of the bytes before them), which a reader recomputes from the values it reads padded to the chunk shape; and
  the SHA-256 of the spec's canonical JSON. A chunk moved after the store was opened is refused when it is read."""
  import hashlib
  import shutil
  import google_crc32c
  from shared.cache import COMPLETE_KEY
  from teacher_cache.info import cache_info
  attrs = json.load(open(os.path.join(cache_path, "zarr.json")))["attributes"]
  record, spec = attrs[COMPLETE_KEY], attrs["stillroom"]
  assert record["spec_sha256"] == hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
                                                 ).hexdigest()
  group = zarr.open_group(cache_path, mode="r")
  arrays = [a["name"] for a in spec["arrays"] if a["role"] != "bookkeeping"]
  assert sorted(record["chunk_crc32c"]) == sorted(arrays) and "chunk_committed" not in record["chunk_crc32c"]
  for name in arrays:
    array, digits = group[name], record["chunk_crc32c"][name]
    chunks = -(-array.shape[0] // array.chunks[0])
    assert len(digits) == 8 * chunks, name
    for k in range(chunks):
      stored = open(_chunk_file(cache_path, name, k), "rb").read()
      values = np.zeros(array.chunks, array.dtype)
      part = array[k * array.chunks[0]:(k + 1) * array.chunks[0]]
      values[:len(part)] = part
      assert int(digits[8 * k:8 * k + 8], 16) == int.from_bytes(stored[-4:], "little") == google_crc32c.value(
          stored[:-4]) == google_crc32c.value(values.astype(values.dtype.newbyteorder("<")).tobytes()), (name, k)
  assert cache_info(cache_path)["completion"]["chunk_crc32c"] == {
      name: -(-group[name].shape[0] // group[name].chunks[0]) for name in arrays}
  store = str(tmp_path / "c.zarr")
  shutil.copytree(cache_path, store)
  cache = open_cache(store)
  first, second = _chunk_file(store, "labels", 1), _chunk_file(store, "labels", 2)
  os.rename(first, first + ".x")
  os.rename(second, first)
  os.rename(first + ".x", second)
  cache.read_chunk(0, ["labels"])
  with pytest.raises(StillroomError, match=r"array 'labels': chunk 1 holds chunk 2's data: not the chunk its "
                                           r"completion record lists for that position"):
    cache.read_chunk(1, ["labels"])
  labels = zarr.open_group(store, mode="r+")["labels"]
  labels[0] = labels[0] + 1  # Rewritten through Zarr: a valid checksum, of other values.
  with pytest.raises(StillroomError, match=r"array 'labels': chunk 0: not the chunk its completion record lists"):
    open_cache(store, require_complete=False).read_chunk(0, ["labels"])


def test_the_projected_size_of_a_store_is_its_size_on_disk(cache_path):
  """What `build` checks against the free disk (`projected_bytes`: whole padded chunks with their checksums, in whole
  blocks, and Zarr's metadata files and directories) against what `du` counts: every file's and directory's
  allocated blocks."""
  from shared.limits import block_size
  from teacher_cache.build import projected_bytes
  entries = [cache_path] + [os.path.join(root, name) for root, folders, files in os.walk(cache_path)
                            for name in folders + files]
  if os.lstat(cache_path).st_blocks == 0:
    pytest.skip("a file system whose directories take no blocks (tmpfs): the projection counts them")
  allocated = sum(os.lstat(entry).st_blocks * 512 for entry in entries)
  projected = projected_bytes(open_cache(cache_path).spec, block_size(cache_path))
  assert abs(projected - allocated) <= 0.01 * allocated, (projected, allocated)  # 0.994 on ext4.


def test_chunk_checksums_are_read_by_threads_only_where_each_read_waits(tmp_path, monkeypatch):
  """`storage.read_tails` reads local files one after the other (threads would cost more than a read from the page
  cache), and the rest by a pool of threads once the first few show that each read waits (NFS, a cold disk); either
  way each file's last bytes in order, None for one that is not there."""
  import builtins
  import threading
  import time
  from shared import storage
  paths = [str(tmp_path / f"f{i}") for i in range(3 * storage._TAIL_THREADS)]  # pylint: disable=protected-access
  for i, path in enumerate(paths):
    if i % 7 != 3:
      with open(path, "wb") as f:
        f.write(bytes(range(i, i + 9)))
  expected = [None if i % 7 == 3 else bytes(range(i + 5, i + 9)) for i in range(len(paths))]
  readers = set()

  def reading(*args, **kwargs):
    readers.add(threading.current_thread().name)
    return builtins.open(*args, **kwargs)

  monkeypatch.setattr(storage, "open", reading, raising=False)
  with monkeypatch.context() as quick:  # However loaded the machine, no read waits as long as this.
    quick.setattr(storage, "_SLOW_TAIL_S", 0.5)
    assert storage.read_tails(paths, 4) == expected and readers == {threading.current_thread().name}

  def waiting(*args, **kwargs):
    time.sleep(0.001)  # A round trip.
    return reading(*args, **kwargs)

  monkeypatch.setattr(storage, "open", waiting, raising=False)  # Five times the threshold.
  readers.clear()
  assert storage.read_tails(paths, 4) == expected and len(readers) > 2


def test_a_store_completed_before_the_record_held_its_checks_stays_readable(tmp_path, cache_path, data_dir, teachers,
                                                                             caplog):
  """A store of schema 2 to 5 completed before the record held its digest and chunk table is read without those
  checks (`verify` says "skip"), and the build command that made it still finds it complete (its schema aside, the
  same build); schema 6 without them is damage (`test_faults`)."""
  import logging
  import shutil
  from conftest import tree_digest
  from shared.cache import COMPLETE_KEY
  from teacher_cache.build import BuildConfig, build_cache
  store = str(tmp_path / "c.zarr")
  shutil.copytree(cache_path, store)
  meta = json.load(open(os.path.join(store, "zarr.json")))
  meta["attributes"][COMPLETE_KEY] = {"finished_at": "2026-01-01T00:00:00+00:00", "rows": 400}  # As 0.3 wrote it...
  meta["attributes"]["stillroom"]["schema_version"] = 2  # ...with the schema of a dense cache before 6.
  json.dump(meta, open(os.path.join(store, "zarr.json"), "w"))
  checks = {c.name: c for c in verify_cache(store, data_dir=data_dir)}
  assert not any(c.failed for c in checks.values())
  assert checks["spec as the completion record covers it"].ok is None
  assert "holds no digest of the spec" in checks["spec as the completion record covers it"].detail
  assert checks["chunks where the completion record puts them"].ok is None
  assert "holds no chunk table" in checks["chunks where the completion record puts them"].detail
  assert len(open_cache(store).read_chunk(1, ["targets"])["targets"]) == 64
  before = tree_digest(store)
  with caplog.at_level(logging.INFO):
    build_cache(BuildConfig(dataset="digits", split="train[:200]", data_dir=data_dir, teachers=tuple(teachers[:2]),
                            out=store, progress=False, views=2, chunk_rows=64))
  assert "already complete with these settings; nothing to do" in caplog.text and tree_digest(store) == before


def test_version_1_cache_still_reads_with_a_warning(tmp_path, data_dir, capsys):
  """The fixture was written by stillroom 0.1 (commit 33e146a): digits train[:40], 2 random mlp-tiny teachers,
  2 views, 32-row chunks, no checksums, all-zero chunks absent, examples in split order."""
  with zipfile.ZipFile(V1_FIXTURE) as archive:
    archive.extractall(tmp_path)
  store = str(tmp_path / "v1_digits.zarr")
  cache = open_cache(store)
  assert "schema version 1: its chunks carry no checksums" in capsys.readouterr().err
  spec = cache.spec
  assert spec.schema_version == 1 and spec.row_order == "sequential" and not spec.has_checksums
  assert spec.members[0].trained_epochs == 1 and spec.eval_dataset is None
  np.testing.assert_array_equal(cache["index"][:], np.tile(np.arange(40), 2))
  checks = {c.name: c for c in verify_cache(store, data_dir=data_dir)}
  assert all(c.ok for c in checks.values()), checks
  assert "schema 1" in checks["chunks readable"].detail and "every chunk present" not in checks
  final = fit(FitConfig(model="mlp-tiny", cache=store, data_dir=data_dir, epochs=1, batch_size=16,
                        out=str(tmp_path / "run"), progress=False))
  assert final["rows"] == 80 and np.isfinite(final["loss"])
