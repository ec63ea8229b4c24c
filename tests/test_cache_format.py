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
  # All-zero chunks are on disk too (zarr would skip them and read back zeros): no flips, and view 0's first rows.
  assert not group["flip"][:].any() and not group["view"][:64].any()
  assert os.path.exists(_chunk_file(store, "flip", 0)) and os.path.exists(_chunk_file(store, "view", 0))
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
