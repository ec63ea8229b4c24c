"""Run directories and teachers: the one save/load path both stages use.

A run directory, as written by `student-train fit`:
  RUN_DIR/config.json          a `RunRecord` (the model's spec, its input normalisation, its cross-fitting fold)
                               plus the trainer's resolved config under "resolved".
  RUN_DIR/checkpoints/<epoch>/ orbax checkpoints, named by the number of epochs trained; item "params" holds the
                               model's parameters as a pure dict (the trainer adds its own items beside it).

A teacher is either such a run dir or `module:function` for a JAX model that is not a stillroom run: the function
takes no arguments and returns an `nnx.Module`, or a pair `(apply_fn, params)` with `apply_fn(params, x) -> logits`.
Teachers receive inputs normalised as their config says (external teachers: the dataset's default normalisation).
"""

import dataclasses
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from shared import storage
from shared.data import Normalization
from shared.errors import StillroomError
from shared.models import ModelSpec, build_model

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
PARAMS_ITEM = "params"


def checkpoint_manager(run_dir: str, max_to_keep: int | None = None,
                       this_process_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of a run dir's checkpoints (one place, so both stages agree on the layout).

  Args:
    this_process_only: read an existing checkpoint dir without the other processes of a multi-process job (orbax
      would otherwise wait for them at its barriers): each process loads teachers on its own.
  """
  processes = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()}) \
      if this_process_only else ocp.options.MultiprocessingOptions()
  return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR)),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                    create=not this_process_only,
                                                                    multiprocessing_options=processes))


def params_of(model: nnx.Module) -> dict:
  """The model's parameters as a pure nested dict of arrays (what checkpoints hold)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_digest(params: Any) -> str:
  """SHA-256 over every parameter leaf's path, shape, dtype and bytes: identifies a teacher's weights."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype.str}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossFit:
  """A run trained without one fold of K (`student-train fit --folds K --holdout-fold k`)."""

  folds: int
  holdout_fold: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRecord:
  """What a run dir's config.json says about its model: what loading it as a teacher needs.

  Attributes:
    model: the model's structure.
    normalization: the input normalisation it trained with.
    cross_fit: the fold it held out, or None if it trained on all its examples.
    image_size: S when its inputs were crop views rendered at SxS (evaluation shows it the centre crop at S), or
      None when it saw the images as stored.
  """

  model: ModelSpec
  normalization: Normalization
  cross_fit: CrossFit | None = None
  image_size: int | None = None

  def to_json(self) -> dict:
    d = {"model": self.model.to_dict(), "normalization": self.normalization.to_dict(),
         "cross_fit": None if self.cross_fit is None else dataclasses.asdict(self.cross_fit)}
    return d if self.image_size is None else {**d, "image_size": self.image_size}

  @classmethod
  def from_json(cls, d: dict, where: str) -> "RunRecord":
    try:
      cross_fit = d.get("cross_fit")
      if "cross_fit" not in d and "resolved" in d:  # Written by stillroom 0.1: the fold is in the resolved config.
        trained = d["resolved"]["config"]
        cross_fit = {"folds": trained["folds"], "holdout_fold": trained["holdout_fold"]} if trained["folds"] > 1 \
            else None
      return cls(model=ModelSpec.from_dict(d["model"]), normalization=Normalization.from_dict(d["normalization"]),
                 cross_fit=None if cross_fit is None else CrossFit(**cross_fit), image_size=d.get("image_size"))
    except (KeyError, TypeError, AttributeError) as e:
      raise StillroomError(f"{where}: {CONFIG_FILE} lacks a valid 'model', 'normalization' or 'cross_fit' entry "
                           f"({type(e).__name__}: {e}).") from e


def read_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, CONFIG_FILE)
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise StillroomError(f"{run_dir!r} is a file, not a run dir.")
  if not os.path.isdir(run_dir):
    raise StillroomError(f"teacher run dir {run_dir!r} does not exist.")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise StillroomError(f"{run_dir!r} is not a run dir: it has no {CONFIG_FILE}.") from e
  except (OSError, json.JSONDecodeError) as e:
    raise StillroomError(f"cannot read {path!r}: {e}") from e


def save_run(run_dir: str, record: RunRecord, model: nnx.Module, trained_epochs: int = 0) -> None:
  """Writes a minimal run dir: `config.json` and one checkpoint with the model's parameters.

  The trainer writes richer checkpoints through `checkpoint_manager`; this is for models made elsewhere
  (tests, conversions) that should be usable as teachers.

  Args:
    run_dir: directory to create.
    record: the model's spec, normalisation and cross-fitting fold.
    model: the model whose parameters to save.
    trained_epochs: the checkpoint's number.
  """
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
    json.dump(record.to_json(), f, indent=2)
  manager = checkpoint_manager(run_dir)
  manager.save(trained_epochs, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params_of(model))}))
  manager.wait_until_finished()
  manager.close()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Teacher:
  """A loaded teacher: a pure `apply_fn(params, x) -> logits [B, C]` and its parameters.

  Attributes:
    name: short display name (run dir basename, or `module:function`).
    source: where it came from (run dir path or `module:function`).
    model: registry name, or "external".
    apply_fn: pure function of (params, normalised float32 inputs [B, ...]) to logits [B, C].
    params: parameter pytree.
    normalization: input normalisation, or None to use the dataset's default.
    trained_epochs: epochs trained when the checkpoint was written (None for external teachers).
    record: the run dir's `RunRecord` (None for external teachers).
  """

  name: str
  source: str
  model: str
  apply_fn: Callable
  params: Any
  normalization: Normalization | None
  trained_epochs: int | None = None
  record: RunRecord | None = None

  @property
  def digest(self) -> str:
    return param_digest(self.params)

  @property
  def num_params(self) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(self.params)))


def _module_apply_fn(model: nnx.Module) -> tuple[Callable, Any]:
  """Splits an NNX module into a pure apply function over its parameters, in eval mode."""
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  return apply_fn, params


def load_run_teacher(run_dir: str) -> Teacher:
  """Loads the latest checkpoint of a run dir as a teacher.

  Raises:
    StillroomError: missing or unreadable dir, config or checkpoint; unknown model.
  """
  config = read_config(run_dir)
  record = RunRecord.from_json(config, repr(run_dir))
  spec = record.model
  model = nnx.eval_shape(lambda: build_model(spec))
  apply_fn, abstract = _module_apply_fn(model)
  if not os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
    raise StillroomError(f"teacher run dir {run_dir!r} has no {CHECKPOINT_DIR}/ directory: is it trained?")
  manager = checkpoint_manager(run_dir, this_process_only=True)
  step = manager.latest_step()
  if step is None:
    raise StillroomError(f"teacher run dir {run_dir!r} has no finished checkpoint.")
  # On this process's first device: the saved sharding names the saving job's devices, which may be another
  # process's here.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(abstract))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
  except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints.
    raise StillroomError(f"cannot read the checkpoint of teacher {run_dir!r} (step {step}): {e}") from e
  finally:
    manager.close()
  params = abstract
  nnx.replace_by_pure_dict(params, restored[PARAMS_ITEM])
  # stillroom 0.1's trainer numbered its checkpoints from 0 at the end of the first epoch.
  trained_epochs = int(step) + (1 if config.get("software_version") == "0.1.0" else 0)
  return Teacher(name=os.path.basename(os.path.normpath(run_dir)), source=os.path.abspath(run_dir), model=spec.name,
                 apply_fn=apply_fn, params=params, normalization=record.normalization, trained_epochs=trained_epochs,
                 record=record)


def load_external_teacher(reference: str) -> Teacher:
  """Loads `module:function` (the current directory is importable, as with `python -m`)."""
  module_name, _, function_name = reference.partition(":")
  if not module_name or not function_name:
    raise StillroomError(f"teacher {reference!r}: expected a run dir or 'module:function'.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    function = getattr(importlib.import_module(module_name), function_name)
  except (ImportError, AttributeError) as e:
    raise StillroomError(f"teacher {reference!r}: cannot import it ({e}).") from e
  made = function()
  if isinstance(made, nnx.Module):
    apply_fn, params = _module_apply_fn(made)
  elif isinstance(made, tuple) and len(made) == 2 and callable(made[0]):
    apply_fn, params = made
  else:
    raise StillroomError(
        f"teacher {reference!r} returned {type(made).__name__}; it must return an nnx.Module or "
        "(apply_fn, params).")
  return Teacher(name=reference, source=reference, model="external", apply_fn=apply_fn, params=params,
                 normalization=None)


def load_teacher(reference: str) -> Teacher:
  """A run dir path, or `module:function` when no such path exists and the text has one colon."""
  storage.require_local(reference, "--teacher")
  if not os.path.exists(reference) and reference.count(":") == 1 and "/" not in reference.split(":")[0]:
    return load_external_teacher(reference)
  return load_run_teacher(reference)
