"""Distillation terms as a registry: each term is one registered object, and a run's step sums them, weighted.

Every term carries its own:
- `name`, chosen on the command line, and `description`, one line for `--help`;
- which cache arrays it reads (`arrays`), so that the plan and the loader read those, and a cache that lacks them
  is refused with an error naming what is missing;
- how its settings are parsed and checked against the cache's spec;
- its loss.

Two kinds share that interface:
- logit terms (`LogitTerm`, `--loss NAME[:SETTINGS]`): one per student, the soft term weighted 1 − alpha beside the
  hard-label cross-entropy. Its settings (e.g. a divergence's β) are a pytree traced per student, so students of one
  vmapped group that differ in them share one compilation, as they do in T.
- feature terms (`FeatureLoss`, `--hint/--attention/--similarity S=T`): pairs of a student feature and a cached
  teacher feature, any number of them, each family weighted by its `--NAME-weight`.

A family of terms is a module of this package; importing it registers its terms (the imports at the bottom of this
file). Adding a term is a class with `@register` in such a module.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from shared.cache import CacheSpec
from shared.errors import StillroomError
from shared.losses import hard_cross_entropy, mixed_cross_entropy

TERMS: dict = {}  # name -> the registered term (a `LogitTerm` or a `FeatureLoss`).


def register(cls):
  """Class decorator: registers one instance of a term class under its `name`."""
  if cls.name in TERMS:
    raise ValueError(f"a distillation term {cls.name!r} is registered twice")
  TERMS[cls.name] = cls()
  return cls


@dataclasses.dataclass(frozen=True)
class Teacher:
  """What the teacher gives one student's logit term for a batch (`student_train.steps.teacher_of` builds it).

  Attributes:
    log_probs: [B, C] the ensemble's log-probabilities at the student's T (stored, or re-derived from the member
      logits), or None.
    logits: [B, C] the members' weighted mean logits (from the member logits), or None.
    sparse: a sparse cache's stored targets, or None: "ids" and "log_probs" [B, K], and "log_rest" [B] (top-k) or
      "counts" [B, K] (sampled).
    use_sparse: with both `sparse` and `log_probs`, whether the student learns the sparse ones: a Python bool (known
      when tracing: one branch computed) or a traced one.
  """

  log_probs: jax.Array | None = None
  logits: jax.Array | None = None
  sparse: dict | None = None
  use_sparse: bool | jax.Array = True

  @property
  def empty(self) -> bool:
    """Hard-label training: the batch holds nothing of the teacher's."""
    return self.log_probs is None and self.logits is None and self.sparse is None


class LogitTerm:
  """A soft term of the student's logits against the teacher's, chosen with `--loss NAME[:ARGUMENT]`.

  Subclasses set the class attributes and `loss`, and `parse` when they take an argument.

  Attributes:
    name: its `--loss` name.
    description: one line for `--help`.
    argument: how `--help` writes its argument after the name, e.g. "[:β]" ("" for none).
    stored: the kinds of stored targets (`shared.cache.TARGET_KINDS`) it learns from as the cache stores them; a
      student whose cache stores another kind (or whose T, rule or members differ from the cache's) re-derives
      dense targets and mean logits from `member_logits`.
  """

  name: ClassVar[str]
  description: ClassVar[str]
  argument: ClassVar[str] = ""
  stored: ClassVar[tuple[str, ...]] = ()

  def parse(self, argument: str | None):
    """Its settings from the text after `NAME:` (None when there is none).

    Returns:
      A pytree of scalars (traced per student in the step), or () when it has no settings.

    Raises:
      ValueError: what is wrong, as "NAME takes ..." (`check_loss` quotes it).
    """
    if argument is not None:
      raise ValueError(f"{self.name} takes no argument")
    return ()

  def reads_stored(self, spec: CacheSpec) -> bool:
    """Whether the cache's stored targets, as stored, serve it (when the student's T, rule and members are the
    cache's)."""
    return spec.target_kind in self.stored and bool(spec.target_arrays)

  def arrays(self, spec: CacheSpec, use_stored: bool) -> tuple[str, ...]:
    """The cache arrays a student of it reads: the stored targets, or the member logits it re-derives them from."""
    return spec.target_arrays if use_stored else ("member_logits",)

  def serves(self, teacher: Teacher) -> bool:
    """Whether a batch's `teacher` holds what its loss reads (by default, a dense distribution)."""
    return teacher.log_probs is not None

  def loss(self, student_logits: jax.Array, teacher: Teacher, temperature, settings) -> jax.Array:
    """The term per example.

    Args:
      student_logits: [B, C].
      teacher: the batch's teacher inputs (`serves(teacher)` holds).
      temperature: T > 0, a float or a traced scalar.
      settings: its settings (`parse`), traced.

    Returns:
      [B] the loss per example.
    """
    raise NotImplementedError


class FeatureLoss:
  """A family of feature terms, chosen with `--NAME S=T[:KIND][@MEMBER],...`, weighted by `--NAME-weight`.

  Subclasses set the class attributes, `resolve` and `loss` (see `student_train.terms.features`).

  Attributes:
    name: its option's name.
    description: one line for `--help`.
    usable_kinds: the kinds of stored teacher features it can use (`shared.cache.FEATURE_KINDS`), preferred first.
    one_member: whether a pair names one member's feature (channels do not align between networks), not the
      members' mean.
  """

  name: ClassVar[str]
  description: ClassVar[str]
  usable_kinds: ClassVar[tuple[str, ...]]
  one_member: ClassVar[bool] = False

  def resolve(self, student: str, student_shape: tuple[int, ...], stored: list, kind: str, text: str):
    """One pair resolved against the student's feature shape and the cache's stored features (`stored`: the
    `FeatureSpec`s of the members it uses, of `kind`): its `FeatureTerm` (`student_train.terms.features`).

    Raises:
      StillroomError: shapes that cannot be paired (why, and what can).
    """
    raise NotImplementedError

  def arrays(self, term) -> tuple[str, ...]:
    """The cache arrays a resolved pair reads: its teacher features."""
    return term.teacher

  def loss(self, term, student: jax.Array, teachers: list[jax.Array], mask: jax.Array, regressor) -> jax.Array:
    """The pair's loss over a batch.

    Args:
      term: the resolved pair.
      student: [B, ...] the student's feature.
      teachers: [B, ...] the teacher feature of each member the pair uses.
      mask: [B] 1 for real rows, 0 for padding (padded rows count in nothing).
      regressor: its learned regressor (an `nnx.Linear`), for families that learn one; else None.

    Returns:
      [] the batch's loss.
    """
    raise NotImplementedError


def logit_term(name: str) -> LogitTerm:
  """The registered logit term `name`."""
  return LOGIT_TERMS[LOSS_NAMES.index(name)]


def _split(text: str) -> tuple[str, str | None]:
  name, colon, argument = str(text).strip().partition(":")
  return name, argument if colon else None


def parse_loss(text: str) -> tuple[int, object]:
  """`--loss NAME[:ARGUMENT]` -> (the index of its term in `LOGIT_TERMS`, its settings).

  Raises:
    StillroomError: an unknown name or a bad argument, named.
  """
  problem = check_loss(text)
  if problem is not True:
    raise StillroomError(f"--loss {problem}, got {text}.")
  name, argument = _split(text)
  return LOSS_NAMES.index(name), logit_term(name).parse(argument)


def canonical_loss(text: str) -> str:
  """One spelling of a valid `--loss` value, so that equal losses are one run identity: `jsd`, ` jsd` and
  `jsd:0.50` are `jsd:0.5`; `kl` stays `kl`."""
  name, argument = _split(text)
  settings = jax.tree.leaves(logit_term(name).parse(argument))
  return name + "".join(f":{float(value):g}" for value in settings)


def check_loss(text) -> bool | str:
  """A check of a `--loss` value (the `check` of `FitConfig.loss`): True, or what is wrong."""
  name, argument = _split(text) if isinstance(text, str) else (None, None)
  if name not in LOSS_NAMES:
    return f"must be one of {', '.join(term.name + term.argument for term in LOGIT_TERMS)}"
  try:
    logit_term(name).parse(argument)
  except ValueError as e:
    return str(e)
  return True


def loss_settings(index: int | None = None, settings=None) -> tuple:
  """Every logit term's settings, in `LOGIT_TERMS` order, as a student's step reads them: the `settings` of its own
  term (`index`), the others' defaults (unused, but every student of a group carries the same structure)."""
  return tuple(settings if k == index else term.parse(None) for k, term in enumerate(LOGIT_TERMS))


def soft_loss(student_logits: jax.Array, teacher: Teacher, temperature, loss, settings: tuple,
              candidates: tuple[int, ...] | None = None) -> jax.Array:
  """A student's soft term: the logit term `loss` of `LOGIT_TERMS`.

  Args:
    student_logits: [B, C].
    teacher: the batch's teacher inputs (not empty).
    temperature: T of the soft term.
    loss: the term's index: a Python int (only that term is computed), or a traced one (the terms of `candidates`
      are computed and the student's selected, as students of one vmapped step may differ in their loss).
    settings: every term's settings (`loss_settings`).
    candidates: with a traced `loss`, the indices it may take (default: every term); those the batch cannot serve
      are left out.

  Returns:
    [B] the soft term.
  """
  if isinstance(loss, (int, np.integer)):
    term = LOGIT_TERMS[loss]
    if not term.serves(teacher):
      raise ValueError(f"the {term.name} loss needs teacher inputs the batch does not hold")
    return term.loss(student_logits, teacher, temperature, settings[loss])
  indices = [k for k in (range(len(LOGIT_TERMS)) if candidates is None else candidates)
             if LOGIT_TERMS[k].serves(teacher)]
  if len(indices) == 1:  # What the batch holds serves one term only: the students' must be that one.
    return soft_loss(student_logits, teacher, temperature, indices[0], settings)
  values = [LOGIT_TERMS[k].loss(student_logits, teacher, temperature, settings[k]) for k in indices]
  soft = values[0]
  for k, value in zip(indices[1:], values[1:]):
    soft = jnp.where(loss == k, value, soft)
  return soft


def distillation_loss(student_logits: jax.Array, labels: jax.Array, alpha, teacher: Teacher, *, temperature, loss,
                      settings: tuple, candidates: tuple[int, ...] | None = None, mix: tuple | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`alpha · CE(y, softmax(s)) + (1 − alpha) · soft`, soft being the student's logit term (`soft_loss`).

  Hard-label training passes an empty `teacher`: the soft term is zero. On mixed views the hard term is
  `λ·CE(y) + (1 − λ)·CE(y_partner)` (`shared.losses.mixed_cross_entropy`).

  Args:
    student_logits: [..., C].
    labels: int [...]; ignored (may be -1) where alpha is 0.
    alpha: weight of the hard term in [0, 1] (a float or a traced scalar).
    teacher, temperature, loss, settings, candidates: see `soft_loss`.
    mix: mixed views: `(partner_labels int [...], lam float [...])` (a batch's `mix_labels` and `mix_lambda`; λ 1
      where a row is not mixed); None: none are.

  Returns:
    `(total, hard, soft)`, each [...].
  """
  if mix is None:
    hard = hard_cross_entropy(student_logits, jnp.maximum(labels, 0))
  else:
    hard = mixed_cross_entropy(student_logits, jnp.maximum(labels, 0), jnp.maximum(mix[0], 0), mix[1])
  soft = jnp.zeros_like(hard) if teacher.empty else soft_loss(student_logits, teacher, temperature, loss, settings,
                                                               candidates)
  return alpha * hard + (1.0 - alpha) * soft, hard, soft


# The families, in the order `--help` lists their terms: importing a module registers its terms.
from student_train.terms import logits  # noqa: E402,F401  pylint: disable=wrong-import-position
from student_train.terms import features  # noqa: E402,F401  pylint: disable=wrong-import-position
from student_train.terms import divergences  # noqa: E402,F401  pylint: disable=wrong-import-position

LOGIT_TERMS: tuple[LogitTerm, ...] = tuple(t for t in TERMS.values() if isinstance(t, LogitTerm))
LOSS_NAMES: tuple[str, ...] = tuple(term.name for term in LOGIT_TERMS)
FEATURE_LOSSES: tuple[FeatureLoss, ...] = tuple(t for t in TERMS.values() if isinstance(t, FeatureLoss))
LOSS_HELP = "the soft term beside the hard labels: " + "; ".join(
    f"{term.name}{term.argument}: {term.description}" for term in LOGIT_TERMS)
