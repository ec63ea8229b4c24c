"""Feature-based distillation from a cache's stored teacher features (`teacher-cache build --features`).

Three families of terms pair a named student feature S with a cached teacher feature T (`--hint/--attention/
--similarity S=T[:KIND][@MEMBER]`), each added to the logit loss with its weight:

- hint (FitNets, Romero et al. 2015): a learned regressor (a linear map of the channels: a 1×1 convolution on a
  map) takes S to T's channels, and `shared.losses.hint_loss` pulls it to T, pooled to S's H×W. `--hint-epochs E`
  trains on the hint alone for the first E epochs (FitNets' stage 1).
- attention (Zagoruyko & Komodakis 2017): S's normalised attention map against T's (the members' mean).
- similarity (Tung & Mori 2019): the batch's normalised Gram matrix of S against T's (the members' mean Gram).

The regressors are trained with the student (`Distilled`) but are not part of it: checkpoints' parameters, teachers
loaded from the run and exports hold the student alone.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from shared.cache import CacheSpec
from shared.errors import StillroomError
from shared.losses import (attention_transfer, average_pool, hint_loss, masked_mean, normalized, pool_factors,
                           similarity_preserving, stored_feature)
from student_train.terms import TERMS, FeatureLoss, register


@dataclasses.dataclass(frozen=True)
class FeatureTerm:
  """One feature loss of a run, resolved against the student and the cache.

  Attributes:
    loss: the name of its family (a registered `FeatureLoss`: hint, attention, similarity).
    student: the student's feature name.
    teacher: the cache arrays of the teacher feature, one per member it averages (a hint: one).
    kind: what those arrays hold (`shared.cache.FEATURE_KINDS`).
    pool: the (fy, fx) average pooling that takes the teacher's H×W to the student's; None for vectors.
    regressor: a hint's regressor (input, output) widths; None for the other losses.
  """

  loss: str
  student: str
  teacher: tuple[str, ...]
  kind: str
  pool: tuple[int, int] | None = None
  regressor: tuple[int, int] | None = None

  def describe(self) -> str:
    return f"--{self.loss} {self.student}={','.join(self.teacher)}"


def parse_pair(text: str, option: str) -> tuple[str, str, str | None, int | None]:
  """`"stage1=stage1:map@0"` -> ("stage1", "stage1", "map", 0): student feature, teacher feature, its kind (None:
  whichever the cache stores) and member (None: every member of the run's ensemble).

  Raises:
    StillroomError: not of that form.
  """
  student, _, teacher = text.strip().partition("=")
  teacher, _, member = teacher.partition("@")
  name, _, kind = teacher.partition(":")
  if not student or not name or "@" in member or (member and not (member.isascii() and member.isdigit())) or \
      ("@" in text and not member):
    raise StillroomError(f"{option} {text!r}: give STUDENT_FEATURE=TEACHER_FEATURE[:KIND][@MEMBER], e.g. "
                         "stage1=stage1 (`student-train models` lists the student's features, `teacher-cache info` "
                         "the cache's).")
  return student, name, kind or None, int(member) if member else None


def plan_feature_terms(pairs: dict[str, tuple[str, ...]], spec: CacheSpec, members: tuple[int, ...],
                       student_shapes: dict[str, list[int]], model: str) -> tuple[FeatureTerm, ...]:
  """Resolves `--hint/--attention/--similarity` pairs against the cache's features and the student's.

  Args:
    pairs: {family name: its `S=T` texts}.
    spec: the cache's spec.
    members: the run's ensemble members (`--members`).
    student_shapes: the student's features (`shared.models.feature_shapes`).
    model: the student's name, for errors.

  Raises:
    StillroomError: a pair that names a feature the student or the cache lacks (naming those it has), a hint
      without one member, or shapes that cannot be paired (why, and what can).
  """
  terms = []
  stored = ", ".join(f"{f.name}:{f.kind}@{f.member}" for f in spec.features) or "none"
  for loss, texts in pairs.items():
    family = TERMS[loss]
    option = f"--{loss}"
    for text in texts:
      text = text.strip()
      student, name, kind, member = parse_pair(text, option)
      if student not in student_shapes:
        raise StillroomError(f"{option} {text}: the student {model!r} has features "
                             f"{', '.join(student_shapes) or 'none (give it a `features` method)'}.")
      if member is not None and member not in members:
        raise StillroomError(f"{option} {text}: member {member} is not among the run's members {list(members)} "
                             f"(the cache has {spec.num_members}; see --members).")
      if member is None and family.one_member and len(members) > 1:
        raise StillroomError(f"{option} {text}: a {loss} regresses one member's features (channels do not align "
                             f"between networks); name it, e.g. {text}@{members[0]} (the run learns from members "
                             f"{list(members)}).")
      chosen = (member,) if member is not None else members
      usable = family.usable_kinds
      kinds = [k for k in ((kind,) if kind else usable) if all(spec.feature(name, k, m) is not None for m in chosen)]
      if not kinds:
        wanted = f"{name}:{kind or usable[0]}" + (f"@{member}" if member is not None else "")
        raise StillroomError(f"{option} {text}: the cache stores no {name}{':' + kind if kind else ''} of member(s) "
                             f"{list(chosen)} that the {loss} loss can use ({', '.join(usable)}); it "
                             f"stores {stored}. Build it with `teacher-cache build --features {wanted}`.")
      kind = kinds[0]
      if kind not in usable:
        raise StillroomError(f"{option} {text}: a {loss} loss takes a teacher's {' or '.join(usable)}, "
                             f"not its {kind}.")
      features = [spec.feature(name, kind, m) for m in chosen]
      term = family.resolve(student, tuple(student_shapes[student]), features, kind, text)
      if any((t.loss, t.student, t.teacher) == (term.loss, term.student, term.teacher) for t in terms):
        raise StillroomError(f"{option} {text}: that pair is given twice.")
      terms.append(term)
  return tuple(terms)


def _one_size(option: str, features: list) -> tuple[int, ...]:
  """The shape of the members' features, whose H×W must agree (their maps are averaged)."""
  sizes = {f.shape[:2] for f in features}
  if len(sizes) > 1:
    raise StillroomError(f"{option}: the members' {features[0].name} differ in size ({sorted(sizes)}); name one "
                         "member with @MEMBER.")
  return features[0].shape


def _pooling(option: str, student: str, student_shape: tuple[int, ...], shape: tuple[int, ...]
             ) -> tuple[int, int] | None:
  """The (fy, fx) pooling that takes a teacher map of `shape` to the student's H×W (None for a teacher vector),
  checked for shapes that fit."""
  if len(shape) < 2:  # A vector; a map is [H, W, C], an attention map [H, W].
    return None
  if len(student_shape) != 3:
    raise StillroomError(f"{option}: the teacher's feature is a {'×'.join(map(str, shape))} map and the "
                         f"student's {student} a vector {list(student_shape)}; pair maps with maps, or use the "
                         "teacher's :pooled vector.")
  pool = pool_factors(shape[:2], student_shape[:2])
  if pool is None:
    raise StillroomError(f"{option}: the teacher's map is {shape[0]}×{shape[1]} and the student's "
                         f"{student_shape[0]}×{student_shape[1]}; the teacher's must be a whole multiple of the "
                         "student's to be pooled to it. Pair features of matching sizes.")
  return pool


@register
class Hint(FeatureLoss):
  """FitNets' hint: `hint_loss` of the student's feature through a learned regressor against the teacher's, pooled
  to the student's H×W (a teacher vector takes the student's pooled vector)."""

  name = "hint"
  description = "FitNets hints: a learned regressor takes the student's feature to the teacher's, mean squared error"
  usable_kinds = ("map", "pooled")
  one_member = True

  def resolve(self, student, student_shape, stored, kind, text) -> FeatureTerm:
    option = f"--{self.name} {text}"
    shape = _one_size(option, stored)
    return FeatureTerm(loss=self.name, student=student, teacher=tuple(f.array_name for f in stored), kind=kind,
                       pool=_pooling(option, student, student_shape, shape), regressor=(student_shape[-1], shape[-1]))

  def loss(self, term, student, teachers, mask, regressor) -> jax.Array:
    teacher = teachers[0] if term.pool is None else average_pool(teachers[0], term.pool)
    if teacher.ndim == 2:  # A teacher vector (pooled, or a dense layer's) takes the student's pooled vector.
      student = stored_feature(student, "pooled")
    return masked_mean(hint_loss(regressor(student), teacher), mask)


@register
class Attention(FeatureLoss):
  """Attention transfer: `attention_transfer` of the student's map against the members' mean attention map, pooled
  to the student's H×W and normalised again."""

  name = "attention"
  description = "attention transfer: the student's normalised H×W attention map against the teacher's"
  usable_kinds = ("attention", "map")

  def resolve(self, student, student_shape, stored, kind, text) -> FeatureTerm:
    option = f"--{self.name} {text}"
    shape = _one_size(option, stored)
    if len(shape) < 2 or len(student_shape) != 3:
      raise StillroomError(f"{option}: attention compares H×W maps; the student's {student} is "
                           f"{list(student_shape)} and the teacher's {stored[0].name} ({kind}) {list(shape)}.")
    return FeatureTerm(loss=self.name, student=student, teacher=tuple(f.array_name for f in stored), kind=kind,
                       pool=_pooling(option, student, student_shape, shape))

  def loss(self, term, student, teachers, mask, regressor) -> jax.Array:
    maps = [t if term.kind == "attention" else stored_feature(t, "attention") for t in teachers]  # [B, H, W]
    # The members' mean map at the student's H×W, normalised again: [B, h·w].
    target = normalized(average_pool(sum(maps) / len(maps), term.pool).reshape(len(mask), -1))
    return masked_mean(attention_transfer(student, target), mask)


@register
class Similarity(FeatureLoss):
  """Similarity-preserving KD: `similarity_preserving` of the batch's Gram matrix against the members' mean Gram."""

  name = "similarity"
  description = "similarity-preserving KD: the batch's normalised Gram matrix of the student's feature against the " \
                "teacher's"
  usable_kinds = ("pooled", "map", "attention")

  def resolve(self, student, student_shape, stored, kind, text) -> FeatureTerm:
    # Any shapes: only each member's similarities of the batch's rows are compared.
    return FeatureTerm(loss=self.name, student=student, teacher=tuple(f.array_name for f in stored), kind=kind)

  def loss(self, term, student, teachers, mask, regressor) -> jax.Array:
    return similarity_preserving(student, teachers, mask)


class Regressors(nnx.Module):
  """The learned regressors of a run's feature terms that have one (hints): one linear map of the channels each (a
  1×1 convolution on a map)."""

  def __init__(self, terms: tuple[FeatureTerm, ...], rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(*term.regressor, rngs=rngs) for term in terms if term.regressor is not None])


class Distilled(nnx.Module):
  """What a run with hints trains: the student and its regressors (only the student is saved as the run's model)."""

  def __init__(self, student: nnx.Module, regressors: Regressors):
    self.student = student
    self.regressors = regressors


def student_of(trainable: nnx.Module) -> nnx.Module:
  """The student of what a run trains (itself, or a `Distilled`'s student)."""
  return trainable.student if isinstance(trainable, Distilled) else trainable


def feature_losses(terms: tuple[FeatureTerm, ...], named: dict[str, jax.Array], batch: dict, mask: jax.Array,
                   trainable: nnx.Module) -> dict[str, jax.Array]:
  """The batch's feature losses, unweighted, each family's summed over its terms: e.g. `{"hint": [],
  "attention": [], "similarity": []}` for the families the terms use.

  Args:
    terms: the run's feature terms.
    named: the student's features of the batch (`model.features`).
    batch: holds the teacher feature arrays the terms name, [B, ...].
    mask: [B] 1 for real rows, 0 for padding (padded rows count in no mean and no similarity).
    trainable: what the run trains (a `Distilled` when a term learns a regressor).
  """
  losses = {}
  regressors = iter(trainable.regressors.layers) if isinstance(trainable, Distilled) else iter(())
  for term in terms:
    teachers = [batch[name].astype(jnp.float32) for name in term.teacher]
    regressor = next(regressors) if term.regressor is not None else None
    # A student computing in bfloat16 gives bfloat16 features: the losses' norms and Gram matrices are float32.
    student = named[term.student].astype(jnp.float32)
    value = TERMS[term.loss].loss(term, student, teachers, mask, regressor)
    losses[term.loss] = losses.get(term.loss, 0.0) + value
  return losses
