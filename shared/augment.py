"""View augmentation as a pure function of `(seed, example index, view id)` (and, for crops, the image's size).

The teacher-cache stage stores one row per `(example, view)` with the view's parameters, and the student renders
the exact same view from them with the same code (`Augmentation.render`), so teacher and student see the same input.

Two kinds of view:
  * **shift** (small fixed-size images such as 8x8 digits): a horizontal flip (optional) followed by a zero-filled
    shift of up to `max_shift` pixels on each spatial axis: `out[y, x] = flipped[y - dy, x - dx]`, zero where that
    falls outside the image. Zero fill, not wrap-around: on 8x8 digits a wrapped pixel lands on the wrong side of
    the digit. View 0 is the un-augmented input.
  * **crop** (`image_size` S; natural images of any size): each view is a crop box (top, left, height, width) in
    source pixels, resized to SxS with PIL's bilinear filter with antialiasing on uint8, then flipped if drawn.
    View 0 is the central square, the same as big_vision's `resize_small(S)|central_crop(S)` (shorter side to S,
    centre crop) up to rounding at the edges; views 1.. are Inception-style random-resized crops (area fraction
    and aspect ratio drawn log-uniform in ranges, 10 tries, then a central crop at the nearest allowed ratio).

Mixed views (`mix`, `--mix mixup:A|cutmix:A`): every augmented view (view 1..V-1) of an example is mixed with a
partner view, another `(example, view)`, drawn from the same counter hash (`mix_params`):
  * the partner example uniform over the transfer set's examples (the row's own example allowed); the partner's view
    is the row's own view id `v` (views of different examples are independent draws of the counter hash, so the
    partner's view `(p, v)` is as random as one of a drawn id). View 0 is never mixed (it stays the clean,
    un-augmented input), so it is never a partner either. No draw depends on the view count V: a row's partner, λ and
    box are the same in a cache of any views that holds the row, so a mixed cache grows (`teacher-cache extend
    --views`) and shrinks (`subset --views`) as an unmixed one does;
  * λ ~ Beta(A, A): the ratio G1 / (G1 + G2) of two Gamma(A) draws (Marsaglia & Tsang's method on counter-hash
    uniforms, a fixed number of tries), so λ too is a pure function of (seed, example index, view);
  * mixup (Zhang et al. 2018): `λ·a + (1 − λ)·b` in float32, of the two views as rendered (uint8 for crops);
  * CutMix (Yun et al. 2019): a box of the partner view `b` pasted into `a`, as their `rand_bbox`: its centre (cy, cx)
    uniform over the pixels, its rows cy ± c // 2 for c = floor(H·sqrt(1 − λ)) (columns alike), clipped to the
    image; the row's λ is then the exact share of `a` left, `1 − h·w / (H·W)`.
Both views are rendered first (on the host or the device, as any view) and mixed by one function (`mix_images`), so
a teacher and its students see the same pixels.
"""

import dataclasses
import functools
import math

import numpy as np

from shared.errors import StillroomError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_DY, _STREAM_DX, _STREAM_FLIP, _STREAM_FOLD, _STREAM_ORDER = 1, 2, 3, 4, 5
_STREAM_CROP = 16  # Crop tries use streams 16.. (4 per try: area, ratio, top, left).
CROP_TRIES = 10
DEFAULT_CROP_AREA = (0.08, 1.0)  # Inception / torchvision RandomResizedCrop.
DEFAULT_CROP_ASPECT = (3 / 4, 4 / 3)
RENDERERS = ("host", "device")  # Where crop views are rendered: `render_crops` in the workers, or `shared.render`.
HOST, DEVICE = RENDERERS
CANVAS = "canvas"  # A device-rendered batch's canvases (`shared.render`), beside its "crop" boxes and "flip"s.
FOLD_SEED = 0  # Fold assignment is fixed: runs and caches made apart must agree on it.
# Mixed views: the partner's example, CutMix's box centre, then each Gamma draw's tries (3 uniforms a try and one for
# the boost), from stream 64 on. (Stream 65 drew the partner's view over 1..V-1 before it became the row's own view: it
# stays unused, so that the other streams keep their numbers.)
_STREAM_PARTNER, _STREAM_BOX_Y, _STREAM_BOX_X, _STREAM_GAMMA = 64, 66, 67, 80
GAMMA_TRIES = 16  # Marsaglia & Tsang accept >= 95% of tries: all 16 fail with probability < 1e-20 (then the mode).
NO_MIX, MIXUP, CUTMIX = "none", "mixup", "cutmix"
MIX_KINDS = (NO_MIX, MIXUP, CUTMIX)
# The row arrays of a mixed view (a cache's arrays of role "view"), and the partner's label a rendered batch carries.
MIX_PARTNER, MIX_VIEW, MIX_LAMBDA, MIX_BOX = "mix_partner", "mix_view", "mix_lambda", "mix_box"
MIX_LABELS = "mix_labels"
# A device-rendered mixed batch's partner canvases, boxes and flips (`shared.render`), beside its own.
MIX_CANVAS, MIX_CROP, MIX_FLIP = "mix_canvas", "mix_crop", "mix_flip"


def parse_mix(text: str) -> tuple[str, float | None]:
  """`"none"` -> ("none", None); `"mixup:A"` / `"cutmix:A"` -> (kind, A) with A > 0 finite.

  Raises:
    StillroomError: another text, or A not a positive number.
  """
  kind, colon, value = str(text).partition(":")
  if kind == NO_MIX and not colon:
    return NO_MIX, None
  if kind in (MIXUP, CUTMIX):
    try:
      alpha = float(value)
    except ValueError:
      alpha = math.nan
    if math.isfinite(alpha) and alpha > 0:
      return kind, alpha
  raise StillroomError(f"--mix {text!r}: give 'none', 'mixup:A' or 'cutmix:A', A > 0 the parameter of λ's Beta(A, A) "
                       "(e.g. mixup:0.2 or cutmix:1).")


def canonical_mix(text: str) -> str:
  """`--mix` as a spec records it: "none", or "mixup:A" / "cutmix:A" with A as Python writes the float ("mixup:.20"
  is "mixup:0.2", "cutmix:1" is "cutmix:1.0")."""
  kind, alpha = parse_mix(text)
  return kind if alpha is None else f"{kind}:{alpha!r}"


def mix_check(text) -> bool | str:
  """The `check` of the `--mix` setting: True, or what is wrong."""
  if text is None:
    return True
  try:
    parse_mix(text)
  except StillroomError:
    return "must be 'none', 'mixup:A' or 'cutmix:A' with A > 0 (e.g. mixup:0.2)"
  return True


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a bijective, well-mixed hash of uint64 arrays (wraps modulo 2**64)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def counter_hash(seed: int, stream: int, index: np.ndarray, view: np.ndarray) -> np.ndarray:
  """Counter-based random bits: uint64 [B] from a seed, a stream id and per-row (index, view)."""
  with np.errstate(over="ignore"):
    z = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream))
    z = _splitmix64(z ^ np.asarray(index, np.int64).astype(np.uint64))
    return _splitmix64(z ^ (np.asarray(view, np.int64).astype(np.uint64) * _GOLDEN))


def _uniform(seed: int, stream: int, index: np.ndarray, view: np.ndarray) -> np.ndarray:
  """float64 [B] uniform in [0, 1), from the top 53 bits of the counter hash."""
  return (counter_hash(seed, stream, index, view) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _open_uniform(seed: int, stream: int, index: np.ndarray, view: np.ndarray) -> np.ndarray:
  """float64 [B] uniform in (0, 1) (never 0: its log is finite), the midpoints of `_uniform`'s 2**53 cells."""
  return ((counter_hash(seed, stream, index, view) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def _log_gamma(seed: int, stream: int, index: np.ndarray, view: np.ndarray, shape: float) -> np.ndarray:
  """float64 [B]: the log of a Gamma(shape, 1) draw per row, from counter-hash uniforms only.

  Marsaglia & Tsang (2000) draw Gamma(shape + 1) (d = shape + 2/3, c = 1/sqrt(9d); a standard normal x by
  Box–Muller, v = (1 + cx)³, accepted when log u < x²/2 + d − dv + d·log v), boosted to Gamma(shape) by U^(1/shape).
  In logs, so that a small shape's tiny draws do not underflow. `GAMMA_TRIES` tries, each on its own streams; a row
  whose every try failed (probability < 1e-20) takes the mode d.
  """
  d = shape + 1.0 - 1.0 / 3.0
  c = 1.0 / math.sqrt(9.0 * d)
  result = np.full(np.shape(index), np.nan)
  for attempt in range(GAMMA_TRIES):
    first = stream + 3 * attempt
    radius = np.sqrt(-2.0 * np.log(_open_uniform(seed, first, index, view)))
    x = radius * np.cos(2.0 * np.pi * _uniform(seed, first + 1, index, view))
    v = (1.0 + c * x) ** 3
    with np.errstate(divide="ignore", invalid="ignore"):
      log_v = np.log(np.where(v > 0, v, 1.0))
      accept = (v > 0) & (np.log(_open_uniform(seed, first + 2, index, view)) < 0.5 * x * x + d - d * v + d * log_v)
    result = np.where(np.isnan(result) & accept, math.log(d) + log_v, result)
  result = np.where(np.isnan(result), math.log(d), result)
  return result + np.log(_open_uniform(seed, stream + 3 * GAMMA_TRIES, index, view)) / shape


def beta_draws(seed: int, stream: int, index: np.ndarray, view: np.ndarray, alpha: float) -> np.ndarray:
  """float64 [B] in [0, 1]: a Beta(alpha, alpha) draw per row, G1 / (G1 + G2) of two Gamma(alpha) draws (streams
  `stream` and `stream + 64`), a pure function of (seed, stream, index, view)."""
  g1 = _log_gamma(seed, stream, index, view, alpha)
  g2 = _log_gamma(seed, stream + 64, index, view, alpha)
  with np.errstate(over="ignore"):
    return 1.0 / (1.0 + np.exp(g2 - g1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Augmentation:
  """How views are drawn and rendered.

  Attributes:
    seed: seeds every view's parameters.
    max_shift: shift views: largest shift in pixels along each spatial axis (0 disables shifts).
    flip: whether views may be flipped horizontally (each with probability 1/2).
    image_size: crop views rendered at image_size x image_size; None: shift views of the stored images.
    crop_area: crop views: range of a random crop's area, as fractions of the image's area.
    crop_aspect: crop views: range of a random crop's width / height.
    renderer: crop views: "host" (`render_crops`, PIL in the input workers) or "device" (`shared.render`: the
      workers read fixed-size canvases and draw boxes and flips; the forward or step renders them). A cache records
      it (omitted for "host", as caches before it were), so its students render the pixels its teachers saw.
    mix: "none", "mixup:A" or "cutmix:A" (`canonical_mix`): views 1.. mixed with a partner view (see the module
      docstring). A cache records it (omitted for "none", as caches before it were).
  """

  seed: int = 0
  max_shift: int = 1
  flip: bool = False
  image_size: int | None = None
  crop_area: tuple[float, float] = DEFAULT_CROP_AREA
  crop_aspect: tuple[float, float] = DEFAULT_CROP_ASPECT
  renderer: str = HOST
  mix: str = NO_MIX

  def __post_init__(self):
    if canonical_mix(self.mix) != self.mix:
      raise StillroomError(f"--mix {self.mix!r} is not written as a cache records it ({canonical_mix(self.mix)!r}).")
    if self.max_shift < 0:
      raise StillroomError(f"max_shift must be >= 0, got {self.max_shift}")
    if self.image_size is not None and not (isinstance(self.image_size, int) and self.image_size >= 1):
      raise StillroomError(f"--image-size must be a positive number of pixels, got {self.image_size}.")
    low, high = self.crop_area
    if not 0 < low <= high <= 1:
      raise StillroomError(f"--crop-area must be two fractions 0 < min <= max <= 1, got {low},{high}.")
    low, high = self.crop_aspect
    if not 0 < low <= high < float("inf"):
      raise StillroomError(f"--crop-aspect must be two ratios 0 < min <= max, got {low},{high}.")
    if self.renderer not in RENDERERS:
      raise StillroomError(f"--renderer must be one of {', '.join(RENDERERS)}, got {self.renderer!r}.")
    if self.renderer != HOST and self.image_size is None:
      raise StillroomError(f"--renderer {self.renderer} renders crop views: give --image-size S (shift views are "
                           "rendered on the host).")

  @property
  def kind(self) -> str:
    """"crop" or "shift" (see the module docstring)."""
    return "shift" if self.image_size is None else "crop"

  @property
  def mix_kind(self) -> str:
    """"none", "mixup" or "cutmix"."""
    return parse_mix(self.mix)[0]

  @property
  def mix_alpha(self) -> float | None:
    """A of λ's Beta(A, A); None without mixing."""
    return parse_mix(self.mix)[1]

  @property
  def mix_names(self) -> tuple[str, ...]:
    """The per-row parameters of mixed views (cache arrays of role "view"), as `mix_params` returns them."""
    if self.mix_kind == NO_MIX:
      return ()
    return (MIX_PARTNER, MIX_VIEW, MIX_LAMBDA) + ((MIX_BOX,) if self.mix_kind == CUTMIX else ())

  @property
  def param_names(self) -> tuple[str, ...]:
    """The per-row view parameters (cache arrays of role "view"): those `view_params` returns, then `mix_names`."""
    return ("shift", "flip") + self.mix_names if self.kind == "shift" else ("crop", "flip") + self.mix_names

  def output_shape(self, input_shape: tuple) -> tuple[int, ...]:
    """The shape of a rendered view of inputs stored with `input_shape` (None for a varying side)."""
    if self.kind == "shift":
      return tuple(input_shape)
    channels = input_shape[2] if len(input_shape) == 3 else None
    return (self.image_size, self.image_size) + ((channels,) if channels is not None else ())

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if self.renderer == HOST:  # As caches before the device renderer recorded their views.
      del d["renderer"]
    if self.mix == NO_MIX:  # As caches before mixed views recorded their views.
      del d["mix"]
    if self.kind == "shift":  # Shift views as stillroom 0.2 recorded them.
      for name in ("image_size", "crop_area", "crop_aspect"):
        del d[name]
    else:  # Crops take no shift.
      del d["max_shift"]
      d.update(crop_area=list(self.crop_area), crop_aspect=list(self.crop_aspect))
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Augmentation":
    d = dict(d)
    for name in ("crop_area", "crop_aspect"):
      if name in d:
        d[name] = tuple(d[name])
    return cls(**d)

  def view_params(self, index: np.ndarray, view: np.ndarray, sizes: np.ndarray | None = None) -> dict:
    """Draws each row's view parameters.

    Args:
      index: int [B] example indices (positions in the unsliced split).
      view: int [B] view ids; view 0 is the un-augmented (shift) or centre-cropped (crop) input.
      sizes: int [B, 2] each source image's (height, width); crop views only.

    Returns:
      shift views: {"shift": int8 [B, 2] as (dy, dx), "flip": bool [B]}; crop views: {"crop": int32 [B, 4] as
      (top, left, height, width) in source pixels, "flip": bool [B]}.
    """
    index, view = np.asarray(index), np.asarray(view)
    augmented = view != 0
    flip = self.flip & augmented & ((counter_hash(self.seed, _STREAM_FLIP, index, view) >> np.uint64(63)) == 1)
    if self.kind == "crop":
      if sizes is None:
        raise ValueError("crop views need each image's size")
      return {"crop": crop_boxes(self, index, view, np.asarray(sizes)), "flip": flip}
    span = np.uint64(2 * self.max_shift + 1)
    dy = (counter_hash(self.seed, _STREAM_DY, index, view) % span).astype(np.int64) - self.max_shift
    dx = (counter_hash(self.seed, _STREAM_DX, index, view) % span).astype(np.int64) - self.max_shift
    shift = (np.stack([dy, dx], axis=-1) * augmented[:, None]).astype(np.int8)
    return {"shift": shift, "flip": flip}

  def render(self, inputs, params: dict) -> np.ndarray:
    """Renders views from their parameters: the one rendering code of teachers (build) and students (training).

    Args:
      inputs: shift views: [B, H, W(, C)] images or [B, D] vectors; crop views: a list of B uint8 images
        [H, W(, C)] of any size (or a [B, H, W(, C)] array).
      params: as `view_params` returns them (or as a cache stores them).

    Returns:
      [B, ...] in the inputs' dtype: the shifted inputs, or the crops at image_size x image_size.
    """
    if self.kind == "shift":
      return apply_view(inputs, params["shift"], params["flip"])
    return render_crops(inputs, params["crop"], params["flip"], self.image_size)

  def render_views(self, inputs, index: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, dict]:
    """Draws the views of `inputs` (examples `index`, views `view`) and renders them; returns (views, params)."""
    sizes = None
    if self.kind == "crop":
      sizes = np.array([x.shape[:2] for x in inputs], np.int64).reshape(-1, 2)
    params = self.view_params(index, view, sizes)
    return self.render(inputs, params), params


def mix_params(augmentation: Augmentation, index: np.ndarray, view: np.ndarray, population: np.ndarray, views: int,
               input_shape: tuple) -> dict:
  """Draws each row's partner view and λ (see the module docstring): a pure function of (seed, index, view) and the
  transfer set, not of the view count. View 0 is not mixed: partner -1, partner view -1, λ 1 (and an empty box).

  Args:
    index: int [B] example indices.
    view: int [B] view ids.
    population: int64 [N] the transfer set's example indices, which partners are drawn from.
    views: V, the views per example: only checked (V >= 2: mixing needs an augmented view); a row's partner view is
      its own view id, so no draw depends on V.
    input_shape: the transfer set's stored shape (CutMix's box is in the pixels of `output_shape(input_shape)`).

  Returns:
    {} without mixing; else `mix_partner` int64 [B] (the partner's example index), `mix_view` int32 [B], `mix_lambda`
    float32 [B] (the share of the row's own view), and for CutMix `mix_box` int32 [B, 4] (top, left, height, width):
    the partner's pixels pasted in.
  """
  kind, alpha = parse_mix(augmentation.mix)
  if kind == NO_MIX:
    return {}
  if views < 2:
    raise StillroomError(f"--mix {augmentation.mix} mixes views 1.. with partner views 1..: it needs --views 2 or more "
                         f"(view 0 is never mixed), got {views}.")
  seed = augmentation.seed
  height, width = (tuple(augmentation.output_shape(tuple(input_shape))) + (1, 1))[:2]
  index, view = np.asarray(index, np.int64), np.asarray(view, np.int64)
  mixed = view != 0
  population = np.asarray(population, np.int64)
  partner = population[(counter_hash(seed, _STREAM_PARTNER, index, view) % np.uint64(len(population))).astype(np.int64)]
  partner_view = view  # The row's own view id: a pure function of (index, view) whatever V is (module docstring).
  lam = beta_draws(seed, _STREAM_GAMMA, index, view, alpha)
  out = {MIX_PARTNER: np.where(mixed, partner, -1).astype(np.int64),
         MIX_VIEW: np.where(mixed, partner_view, -1).astype(np.int32)}
  if kind == CUTMIX:  # Yun et al.'s `rand_bbox`: a centre uniform over the pixels, cy ± floor(H·sqrt(1 − λ)) // 2.
    cy = np.floor(_uniform(seed, _STREAM_BOX_Y, index, view) * height).astype(np.int64)
    cx = np.floor(_uniform(seed, _STREAM_BOX_X, index, view) * width).astype(np.int64)
    cut = np.sqrt(1.0 - lam)
    half_h, half_w = np.floor(height * cut).astype(np.int64) // 2, np.floor(width * cut).astype(np.int64) // 2
    top, bottom = np.clip(cy - half_h, 0, height), np.clip(cy + half_h, 0, height)
    left, right = np.clip(cx - half_w, 0, width), np.clip(cx + half_w, 0, width)
    box = np.stack([top, left, bottom - top, right - left], axis=-1) * mixed[:, None]
    out[MIX_BOX] = box.astype(np.int32).reshape(len(index), 4)
    lam = 1.0 - box[:, 2] * box[:, 3] / (height * width)  # The exact share of the row's own view left.
  out[MIX_LAMBDA] = np.where(mixed, lam, 1.0).astype(np.float32)
  return out


def mix_images(a, b, lam, box=None, xp=np):
  """Mixes views: the one mixing code of the host (NumPy) and the device (`xp=jax.numpy`) renderers.

  Args:
    a: [B, H, W(, C)] the rows' own views as rendered (uint8 for crops), or [B, D] vectors (mixup only).
    b: the partner views, as `a`.
    lam: float32 [B] the share of `a` (`mix_lambda`).
    box: CutMix: int [B, 4] (top, left, height, width) of `b` pasted into `a`; None: mixup.

  Returns:
    mixup: float32 `λ·a + (1 − λ)·b` (λ = 1 gives `a` exactly); CutMix: `a` with the box's pixels of `b`, in their
    dtype.
  """
  if box is None:
    lam = xp.asarray(lam, xp.float32).reshape((-1,) + (1,) * (a.ndim - 1))
    return lam * a.astype(xp.float32) + (xp.float32(1) - lam) * b.astype(xp.float32)
  box = xp.asarray(box)
  top, left, height, width = (box[:, k].reshape(-1, 1, 1) for k in range(4))
  rows = xp.arange(a.shape[1]).reshape(1, -1, 1)
  cols = xp.arange(a.shape[2]).reshape(1, 1, -1)
  inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
  return xp.where(inside.reshape(inside.shape + (1,) * (a.ndim - 3)), b, a)


def crop_boxes(augmentation: Augmentation, index: np.ndarray, view: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Crop boxes int32 [B, 4] (top, left, height, width): the central square for view 0, an Inception-style random
  crop for other views (torchvision's `RandomResizedCrop.get_params`, with counter-hash draws instead of a global
  RNG, so each box is a pure function of (seed, index, view, image size))."""
  height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
  count = len(index)
  # The fallback: a central crop of the whole image clamped to the allowed aspect ratios; for view 0, the square.
  low, high = augmentation.crop_aspect
  ratio = width / height
  fallback_w = np.where(ratio < low, width, np.where(ratio > high, np.round(height * high), width))
  fallback_h = np.where(ratio < low, np.round(width / low), np.where(ratio > high, height, height))
  side = np.minimum(height, width)
  centre = np.asarray(view) == 0
  box_h = np.where(centre, side, fallback_h)
  box_w = np.where(centre, side, fallback_w)
  chosen = centre.copy()
  top, left = np.floor((height - box_h) / 2), np.floor((width - box_w) / 2)
  area = height * width
  log_low, log_high = np.log(low), np.log(high)
  for attempt in range(CROP_TRIES):
    stream = _STREAM_CROP + 4 * attempt
    target = area * (augmentation.crop_area[0] + (augmentation.crop_area[1] - augmentation.crop_area[0])
                     * _uniform(augmentation.seed, stream, index, view))
    aspect = np.exp(log_low + (log_high - log_low) * _uniform(augmentation.seed, stream + 1, index, view))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    fits = ~chosen & (w > 0) & (h > 0) & (w <= width) & (h <= height)
    # Top-left uniform over the positions where the box fits (the inclusive integer ranges 0..H-h, 0..W-w).
    y = np.floor(_uniform(augmentation.seed, stream + 2, index, view) * (height - h + 1))
    x = np.floor(_uniform(augmentation.seed, stream + 3, index, view) * (width - w + 1))
    top, left = np.where(fits, y, top), np.where(fits, x, left)
    box_h, box_w = np.where(fits, h, box_h), np.where(fits, w, box_w)
    chosen |= fits
  boxes = np.stack([top, left, box_h, box_w], axis=-1).astype(np.int32)
  return boxes.reshape(count, 4)


def render_crops(images, boxes: np.ndarray, flip: np.ndarray, size: int) -> np.ndarray:
  """Crops each image to its box, resizes it to size x size (PIL bilinear with antialiasing, on uint8), flips it.

  Args:
    images: B uint8 images [H, W] or [H, W, C] (C = 1 or 3), any size; a list or an array.
    boxes: int [B, 4] (top, left, height, width) in source pixels.
    flip: bool [B].
    size: output side S.

  Returns:
    uint8 [B, S, S] or [B, S, S, C].
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out, previous, whole, single = [], None, None, False
  for image, (top, left, height, width), flipped in zip(images, np.asarray(boxes).tolist(), np.asarray(flip)):
    if image is not previous:  # Consecutive views of one decoded image (`shared.workers.read_once`) share its copy.
      previous, image = image, np.asarray(image)
      if image.dtype != np.uint8:
        raise StillroomError(f"crop views (--image-size) render uint8 images; this dataset stores {image.dtype}.")
      single = image.ndim == 3 and image.shape[2] == 1
      whole = Image.fromarray(image[..., 0] if single else image)
    # Crop, then resize: the filter sees only the box's pixels (`resize(box=...)` would blend in its neighbours).
    pil = whole.crop((left, top, left + width, top + height))
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    if flipped:
      resized = resized[:, ::-1]
    out.append(resized[..., None] if single else resized)
  return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def check_max_shift(max_shift: int, input_shape: tuple[int, ...], option: str) -> None:
  """A shift must leave part of the image: 0 <= max_shift < the smaller spatial side (for image inputs).

  Raises:
    StillroomError: naming the option, the value and the image size.
  """
  if len(input_shape) < 2:
    if max_shift < 0:
      raise StillroomError(f"{option} must be >= 0, got {max_shift}.")
  elif not 0 <= max_shift < min(input_shape[:2]):
    raise StillroomError(f"{option} must be in 0..{min(input_shape[:2]) - 1} for {input_shape[0]}x{input_shape[1]} "
                         f"images, got {max_shift}.")


def make_augmentation(input_shape: tuple, input_dtype, dataset: str, *, seed: int, max_shift: int, flip: bool,
                      image_size: int | None, crop_area=DEFAULT_CROP_AREA,
                      crop_aspect=DEFAULT_CROP_ASPECT, renderer: str | None = None,
                      canvas_shape: tuple | None = None, mix: str | None = None) -> Augmentation:
  """The views for a dataset whose examples are stored with `input_shape` (None for a varying side) and
  `input_dtype`, checked before anything is written; `renderer` (None: "host") renders crop views, the device
  renderer from the fixed canvases of a source that offers them (`canvas_shape`, None where it does not).

  Raises:
    StillroomError: images of varying size without `--image-size`; crops of flat vectors or of non-uint8 data;
      crop ranges without `--image-size`; a bad shift or range; the device renderer without crop views or canvases.
  """
  if len(crop_area) != 2 or len(crop_aspect) != 2:
    raise StillroomError(f"--crop-area and --crop-aspect take two values MIN,MAX; got {crop_area} and {crop_aspect}.")
  if image_size is None:
    if None in input_shape:
      raise StillroomError(f"dataset {dataset!r} holds images of varying size; give --image-size S to render every "
                           "view at SxS (centre crops and random-resized crops).")
    if tuple(crop_area) != DEFAULT_CROP_AREA or tuple(crop_aspect) != DEFAULT_CROP_ASPECT:
      raise StillroomError("--crop-area/--crop-aspect shape crop views, which need --image-size S.")
    check_max_shift(max_shift, input_shape, "--max-shift")
  elif len(input_shape) < 2:
    raise StillroomError(f"--image-size needs image inputs; {dataset!r} holds flat vectors of shape {input_shape}.")
  elif np.dtype(input_dtype) != np.uint8:
    raise StillroomError(f"--image-size renders uint8 images; {dataset!r} stores {np.dtype(input_dtype)}. Without "
                         "--image-size its images are used at their stored size.")
  renderer = renderer or HOST
  mix = canonical_mix(mix or NO_MIX)
  if parse_mix(mix)[0] == CUTMIX and len(input_shape) < 2:
    raise StillroomError(f"--mix {mix} pastes a box of one image into another; {dataset!r} holds flat vectors of "
                         f"shape {input_shape}.")
  if renderer != HOST and image_size is not None and canvas_shape is None:
    raise StillroomError(f"--renderer {renderer} renders crops from fixed-size canvases, which {dataset!r} does not "
                         "offer (images of one shape in memory, such as npz:, do; so do prepared images): use "
                         "--renderer host.")
  return Augmentation(seed=seed, max_shift=max_shift if image_size is None else 0, flip=flip, image_size=image_size,
                      crop_area=tuple(float(v) for v in crop_area), crop_aspect=tuple(float(v) for v in crop_aspect),
                      renderer=renderer, mix=mix)


def fold_of(index: np.ndarray, folds: int) -> np.ndarray:
  """Cross-fitting fold of each example: a fixed hash of its index, int32 [B] in [0, folds).

  Hashed rather than `index % folds`, since a split's order can follow the classes (scikit-learn's digits cycle
  through 0..9).
  """
  index = np.asarray(index)
  if folds <= 1:
    return np.full(index.shape, -1, np.int32)
  return (counter_hash(FOLD_SEED, _STREAM_FOLD, index, np.zeros_like(index)) % np.uint64(folds)).astype(np.int32)


@functools.lru_cache(maxsize=2)  # A build or a check walks the views in order: one or two are live at a time.
def row_permutation(seed: int, view: int, count: int) -> np.ndarray:
  """The order in which a cache stores its examples: a seeded permutation of positions 0..count-1.

  A pure function of (seed, view, count), from the same counter hash as the views (portable across NumPy
  versions, unlike a Generator's stream). The grouped row order (`shared.cache.rows`) uses view 0's for every view;
  the view-major "permuted" order of older caches gave each view its own.

  Returns:
    int64 [count], read-only: entry k is the position of the k-th stored example (of this view).
  """
  keys = counter_hash(seed, _STREAM_ORDER, np.arange(count), np.full(count, view))
  order = np.argsort(keys, kind="stable")
  order.flags.writeable = False
  return order


def apply_view(x: np.ndarray, shift: np.ndarray, flip: np.ndarray) -> np.ndarray:
  """Renders views: flip each image horizontally where asked, then shift it with zero fill.

  Args:
    x: [B, H, W] or [B, H, W, C] images, any dtype; or [B, D] flat vectors, which take no augmentation.
    shift: int [B, 2] as (dy, dx).
    flip: bool [B].

  Returns:
    Array of the same shape and dtype as `x`.
  """
  if x.ndim < 3:
    if np.any(shift) or np.any(flip):
      raise ValueError("flat input vectors cannot be shifted or flipped")
    return x
  if not np.any(flip) and not np.any(shift):
    return x
  x = np.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)
  height, width = x.shape[1], x.shape[2]
  pad = int(np.abs(shift).max())
  padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3))
  rows = np.arange(height)[None, :] + pad - shift[:, 0:1].astype(np.int64)  # [B, H]
  cols = np.arange(width)[None, :] + pad - shift[:, 1:2].astype(np.int64)  # [B, W]
  batch = np.arange(x.shape[0])[:, None, None]
  return padded[batch, rows[:, :, None], cols[:, None, :]]
