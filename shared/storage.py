"""Where stores live: a local path, or an object-store URL (`s3://bucket/path`, `gs://bucket/path`).

URLs go through fsspec, the layer under Zarr's own `FsspecStore`: `s3fs` and `gcsfs` come with the `cloud` extra
(`pip install 'stillroom[cloud]'`). `file://PATH` is the local path PATH. Credentials and endpoints come only from
each cloud SDK's standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...;
`GOOGLE_APPLICATION_CREDENTIALS`, ...), never from stillroom's flags or files.

An object store has no directories, renames or appends, so nothing here relies on them: a store "exists" when
it holds objects under its prefix, and a lock is an object created with a conditional write (see
`shared.outputs.OutputLock`).
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import posixpath
import time

from shared.errors import StillroomError

URL_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}  # Scheme -> the fsspec package that serves it.
CLOUD_EXTRA = "pip install 'stillroom[cloud]'"


def is_url(path: str) -> bool:
  """Whether `path` names an object store (after `local`: `file://` paths are local)."""
  return "://" in path and not path.startswith("file://")


def local(path: str) -> str:
  """`file://PATH` as PATH; anything else unchanged.

  Raises:
    StillroomError: a URL of a scheme stillroom does not serve.
  """
  if path.startswith("file://"):
    return path[len("file://"):]
  if "://" not in path:
    return path
  scheme, rest = path.split("://", 1)
  if scheme not in URL_SCHEMES:
    raise StillroomError(f"{path!r}: unsupported URL scheme; use a local path, file://, "
                         + ", ".join(f"{scheme}://" for scheme in URL_SCHEMES) + " (in lower case).")
  if not rest.strip("/"):
    raise StillroomError(f"{path!r} names no bucket; give {scheme}://BUCKET/PATH.")
  return path


def filesystem(url: str):
  """The fsspec file system of a URL and the path in it.

  Raises:
    StillroomError: the package that serves the scheme is not installed.
  """
  scheme = url.split("://", 1)[0]
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
    fs, inner = fsspec.core.url_to_fs(url)
  except ImportError as e:
    raise StillroomError(f"{url!r} needs the {URL_SCHEMES.get(scheme, scheme)} package: {CLOUD_EXTRA}.") from e
  fs.invalidate_cache()  # Listings are cached per process; another process may have written since.
  return fs, inner


def _on(path: str, remote, here):
  """`remote(fs, key)` for a URL's file system and key, or `here(path)` for a local path (`file://` resolved)."""
  path = local(path)
  if is_url(path):
    return remote(*filesystem(path))
  return here(path)


def size(path: str) -> int:
  """Bytes stored under a directory or an object-store prefix."""
  return _on(path, lambda fs, key: int(fs.du(key, total=True)),
             lambda path: sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
                              for f in files))


def join(path: str, *parts: str) -> str:
  """`path/part/...`, with '/' on an object store."""
  return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def absolute(path: str) -> str:
  """What identifies a location across runs: the absolute local path, or the URL."""
  path = local(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  """Whether a file, directory, object or prefix is there."""
  return _on(path, lambda fs, key: fs.exists(key), os.path.exists)


def has_entries(path: str) -> bool:
  """Whether a directory, or an object-store prefix, holds anything."""
  return _on(path, lambda fs, key: bool(fs.exists(key) and fs.ls(key, detail=False)),
             lambda path: os.path.isdir(path) and bool(os.listdir(path)))


def is_file(path: str) -> bool:
  """Whether `path` is a file (a single object), not a directory or prefix."""
  return _on(path, lambda fs, key: fs.isfile(key), lambda path: os.path.exists(path) and not os.path.isdir(path))


def is_dir(path: str) -> bool:
  """Whether `path` is a directory, or an object-store prefix that holds objects."""
  return _on(path, lambda fs, key: fs.isdir(key), os.path.isdir)


def scan(path: str) -> list[tuple[str, bool, int]]:
  """`[(name, is a directory, size in bytes), ...]` of the entries directly in a directory or a prefix, sorted by
  name, without hidden ones (names starting with '.'). A directory's size is 0."""
  def remote(fs, key):
    # A "folder" placeholder object (`key/`, made by consoles and some tools) is listed as an entry of itself.
    return [(posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory", int(e.get("size") or 0))
            for e in fs.ls(key, detail=True) if e["name"].rstrip("/") != key.rstrip("/")]

  def here(path):
    with os.scandir(path) as entries:
      return [(e.name, e.is_dir(), 0 if e.is_dir() else e.stat().st_size) for e in entries]

  return sorted(entry for entry in _on(path, remote, here) if not entry[0].startswith("."))


def files_under(path: str) -> list[str]:
  """The relative paths ("a/b.json") of every file under a directory or an object-store prefix, hidden ones too,
  sorted; [] when there is none. One listing of the whole tree (an object store's `find`), not one per folder."""
  def remote(fs, key):
    return sorted(found[len(key.rstrip("/")) + 1:] for found in fs.find(key))

  def here(path):
    return sorted(os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
                  for root, _, names in os.walk(path) for name in names)

  return _on(path, remote, here)


def read_bytes(path: str) -> bytes:
  """The content of a file or an object.

  Raises:
    OSError: it cannot be read (FileNotFoundError when absent).
  """
  def here(path):
    with open(path, "rb") as f:
      return f.read()
  return _on(path, lambda fs, key: fs.cat_file(key), here)


def file_digest(path: str) -> tuple[str, int]:
  """The SHA-256 (hex) and size in bytes of a file or an object, read in blocks (a file may exceed memory).

  Raises:
    OSError: it cannot be read (FileNotFoundError when absent).
  """
  def digest(f) -> tuple[str, int]:
    hashed, size = hashlib.sha256(), 0
    while block := f.read(1 << 22):
      hashed.update(block)
      size += len(block)
    return hashed.hexdigest(), size

  def remote(fs, key):
    with fs.open(key, "rb") as f:
      return digest(f)

  def here(path):
    with open(path, "rb") as f:
      return digest(f)
  return _on(path, remote, here)


def read_many(paths: list[str]) -> list[bytes]:
  """The contents of several files or objects of one store; an object store's requests are issued together.

  Raises:
    OSError: one cannot be read (FileNotFoundError when absent); its `filename` is that path as given.
  """
  if not paths or not is_url(local(paths[0])):
    return [read_bytes(path) for path in paths]
  fs, _ = filesystem(paths[0])
  keys = [fs._strip_protocol(path) for path in paths]  # pylint: disable=protected-access  # As url_to_fs does.
  found = fs.cat(keys, on_error="return")
  for path, key in zip(paths, keys):
    error = found.get(key)
    if isinstance(error, BaseException):
      kind = type(error) if isinstance(error, OSError) else OSError
      raise kind(getattr(error, "errno", None) or 0, str(error) or type(error).__name__, path) from error
  return [found[key] for key in keys]


# `read_tails` of local files: the first `_TAIL_THREADS` are read one after the other; if they took more than
# `_SLOW_TAIL_S` each (a network file system's round trip, a cold disk's seek), the rest are read by `_TAIL_THREADS`
# threads at once. A file in the page cache takes about 15 us, and threads would take longer to hand each other the
# interpreter than to read it (measured 7 to 10 times slower on 2 cores: see CHANGELOG, issue 29).
_TAIL_THREADS = 16
_SLOW_TAIL_S = 2e-4


def read_tails(paths: list[str], size: int) -> list[bytes | None]:
  """The last `size` bytes of each of several files or objects of one store (all of a shorter one); None for one
  that is not there. An object store's requests are issued together (one round trip's latency, not one each); local
  files are read by a pool of threads where the first few show that each read waits (NFS, a cold disk).

  Raises:
    OSError: one cannot be read for another reason than its absence.
  """
  if not paths:
    return []
  if not is_url(local(paths[0])):
    def tail(path):
      try:
        with open(local(path), "rb") as f:
          f.seek(max(0, f.seek(0, os.SEEK_END) - size))
          return f.read()
      except FileNotFoundError:
        return None
    start = time.perf_counter()
    found = [tail(path) for path in paths[:_TAIL_THREADS]]
    rest = paths[_TAIL_THREADS:]
    if rest and time.perf_counter() - start > _SLOW_TAIL_S * _TAIL_THREADS:
      with concurrent.futures.ThreadPoolExecutor(_TAIL_THREADS, thread_name_prefix="read-tails") as pool:
        return found + list(pool.map(tail, rest))
    return found + [tail(path) for path in rest]
  fs, _ = filesystem(paths[0])
  keys = [fs._strip_protocol(path) for path in paths]  # pylint: disable=protected-access  # As url_to_fs does.
  found = fs.cat_ranges(keys, [-size] * len(keys), [None] * len(keys), on_error="return")
  tails = []
  for path, result in zip(paths, found):
    if isinstance(result, FileNotFoundError):
      tails.append(None)
    elif isinstance(result, BaseException):
      kind = type(result) if isinstance(result, OSError) else OSError
      raise kind(getattr(result, "errno", None) or 0, str(result) or type(result).__name__, path) from result
    else:
      tails.append(bytes(result))
  return tails


def read_text(path: str) -> str:
  """The text of a file or an object (see `read_bytes`)."""
  return read_bytes(path).decode()


def read_json(path: str):
  """The JSON document at `path` (a file or an object).

  Raises:
    OSError, ValueError: it cannot be read or parsed (FileNotFoundError when absent).
  """
  return json.loads(read_bytes(path))


def write_text(path: str, text: str) -> None:
  """Replaces a file or an object with `text` whole (see `write_bytes`)."""
  write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
  """Replaces a file or an object with `data` whole: a kill leaves the old content or the new, never half.

  Locally it is written beside (`path.tmp`, removed when the write or the rename fails) and renamed; an object store
  makes one PUT visible whole (it has no appends, so a growing file such as `metrics.jsonl` is rewritten each time).
  """
  def here(path):
    try:
      with open(path + ".tmp", "wb") as f:
        f.write(data)
      os.replace(path + ".tmp", path)
    except BaseException:  # A failed write or rename (disk full, a directory at `path`, a signal) leaves nothing.
      with contextlib.suppress(OSError):
        os.remove(path + ".tmp")
      raise
  _on(path, lambda fs, key: fs.pipe_file(key, data), here)


def make_dirs(path: str) -> None:
  """Creates a directory and its parents (an object store needs none: a prefix exists once it holds objects)."""
  _on(path, lambda fs, key: None, lambda path: os.makedirs(path, exist_ok=True))


def remove_file(path: str) -> None:
  """Deletes one file or object.

  Raises:
    FileNotFoundError: it is not there.
  """
  _on(path, lambda fs, key: fs.rm(key), os.remove)


def remove_tree(path: str) -> None:
  """Deletes a directory, or every object under a prefix."""
  import shutil  # pylint: disable=import-outside-toplevel
  _on(path, lambda fs, key: fs.rm(key, recursive=True), shutil.rmtree)


def upload(directory: str, url: str, skip: frozenset[str] = frozenset()) -> None:
  """Copies every file under a local directory to the same relative keys under `url`, concurrently.

  Args:
    skip: relative paths not to copy.
  """
  fs, inner = filesystem(url)
  relative = [r for r in files_under(directory) if r not in skip]
  if relative:
    fs.put([os.path.join(directory, r) for r in relative], [posixpath.join(inner, r) for r in relative])


def download(url: str, directory: str, keep=None) -> None:
  """Copies the objects under `url` to the same relative paths under a local directory, concurrently.

  Args:
    keep: a predicate on each object's key relative to `url` ("a/b.json"): copy only those it accepts (None: all).
  """
  fs, inner = filesystem(url)
  relative = [key for key in files_under(url) if keep is None or keep(key)]
  targets = [os.path.join(directory, *key.split("/")) for key in relative]
  for target in targets:
    os.makedirs(os.path.dirname(target), exist_ok=True)
  if relative:
    fs.get([posixpath.join(inner, key) for key in relative], targets)


def zarr_store(path: str, read_only: bool = False):
  """What `zarr.open_group` opens: the local path itself, or a `FsspecStore` of the URL."""
  path = local(path)
  if not is_url(path):
    return path
  from zarr.storage import FsspecStore  # pylint: disable=import-outside-toplevel
  filesystem(path)  # A missing package is a clear error before zarr's own.
  return FsspecStore.from_url(path, read_only=read_only)
