"""`student-train export`: a run's weights in a plain file that loads without stillroom.

The weights are the model's parameters and, for a model with BatchNorm, its running statistics (`.../mean` and
`.../var` beside each BatchNorm's `scale` and `bias`; the variance is the biased one, and a forward pass in eval mode
normalises with (x - mean) / sqrt(var + 1e-5)): everything an eval-mode forward pass needs. The extension of `--out`
picks the format:

  .npz      one array per weight, named by its path in the model ("linears/0/kernel", "net/stem_norm/mean"):
              params = dict(np.load("student.npz"))
  .msgpack  Flax's msgpack serialization of the nested parameter dict (lists of layers become dicts keyed "0",
            "1", ...):
              from flax import serialization
              with open("student.msgpack", "rb") as f:
                params = serialization.msgpack_restore(f.read())

The model they belong to, and the input normalisation it expects, are the run's `config.json` ("model",
"normalization"), which `export` also prints.
"""

import dataclasses
import io
import os
from typing import ClassVar

import jax
import numpy as np
from flax import nnx, serialization

from shared import storage
from shared.errors import StillroomError
from shared.options import EXPORT
from shared.runs import load_run_teacher
from shared.settings import at_least, check_values, setting

FORMATS = (".npz", ".msgpack")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
  """Settings of `student-train export`."""

  COMMANDS: ClassVar[tuple[str, ...]] = (EXPORT,)

  run: str = setting("", "the run dir to export", commands=(), given_by="RUN_DIR")
  out: str = setting("", f"the file to write: {' or '.join(FORMATS)}", group="run", metavar="FILE")
  overwrite: bool = setting(False, "replace an existing --out", group="run")
  epoch: int | None = setting(None, "export the checkpoint after this many epochs (default: the newest)",
                              group="run", check=at_least(0), metavar="N")


def _name(path) -> str:
  """A parameter's path as "a/0/kernel"."""
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _nested(params) -> dict:
  """The parameters as a nested dict with string keys (what msgpack stores)."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    node = out
    names = _name(path).split("/")
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.asarray(leaf)
  return out


def export_run(run_dir: str, out: str, overwrite: bool = False, epoch: int | None = None) -> dict:
  """Writes the parameters of a run's checkpoint (the newest, or the one after `epoch` epochs) to `out` (a path or an
  object-store URL).

  Returns:
    {"out", "format", "arrays" (count), "parameters" (the count of values, running statistics included), "bytes",
    "model", "normalization", "epoch" (the checkpoint's epochs trained), "epochs" (the same, as earlier versions named
    it)}, and for a specialist "specialist" (its classes, dustbin correction and generalist's digest).

  Raises:
    StillroomError: an unknown extension, an `out` that is a directory, an existing `out` without `overwrite`, a
      run dir that cannot be read, or an `epoch` the run dir does not keep.
  """
  check_values(ExportConfig(run=run_dir, out=out, overwrite=overwrite, epoch=epoch))
  extension = os.path.splitext(out)[1].lower()
  if extension not in FORMATS:
    raise StillroomError(f"--out {out!r}: its extension picks the format; use one of {', '.join(FORMATS)}.")
  if storage.is_dir(out):  # Neither replaced nor written into, with or without --overwrite.
    raise StillroomError(f"--out {out!r} is a directory; give the path of the file to write, e.g. "
                         f"{storage.join(out, 'student' + extension)!r}.")
  if storage.exists(out) and not overwrite:
    raise StillroomError(f"--out {out!r} exists; pass --overwrite to replace it.")
  run = load_run_teacher(run_dir, epoch, "--epoch")
  params = nnx.to_pure_dict(run.params) if isinstance(run.params, nnx.State) else run.params
  flat = {_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  if extension == ".npz":
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    data = buffer.getvalue()
  else:
    data = serialization.msgpack_serialize(_nested(params))
  storage.write_bytes(out, data)
  return {"out": out, "format": extension[1:], "arrays": len(flat),
          "parameters": int(sum(a.size for a in flat.values())), "bytes": len(data),
          "model": run.record.model.to_dict(), "normalization": run.record.normalization.to_dict(),
          "epoch": run.trained_epochs, "epochs": run.trained_epochs,
          # A specialist's outputs are these classes, then a dustbin whose logit this correction raises.
          **({"specialist": run.record.to_json()["specialist"]} if run.record.specialist is not None else {})}
