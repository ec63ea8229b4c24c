"""Crop views rendered on the device: crop, resize and flip as one jitted function of fixed-size uint8 inputs.

`--renderer device` moves this work off the host: the input workers only read each image's canvas (a fixed-size
uint8 array that holds the image at its top left, edge-replicated beyond it: `Source.read_canvas`) and draw its crop
box and flip (`Augmentation.view_params`, cheap), and the build's forward and the student's step render the views
from them (`render_on_device`). It computes what the host renderer (`shared.augment.render_crops`: PIL's bilinear
filter with antialiasing on uint8, crop then resize) computes, as separable weight matrices, one per axis and row,
applied with two matrix products (the formulation of `jax.image.scale_and_translate`), but with PIL's arithmetic:

  * the filter sees only the box's pixels (the weights are zero outside it and normalised over it), as PIL's resize
    of the cropped image does; `scale_and_translate` would blend in the box's neighbours;
  * a triangle of half-width max(scale, 1) centred on each output pixel's centre in the box, sampled at input
    pixel centres (PIL's `precompute_coeffs` for `BILINEAR`), computed in integers and quantised to PIL's 22-bit
    fixed point;
  * the horizontal pass first, its result rounded half up and clipped to 0..255 as PIL's uint8 intermediate image,
    then the vertical pass, rounded likewise; every sum is exact (integers below 2**24 in float32, joined in int32:
    `_pass`),
    so a view is the same on every platform, CPU, GPU or TPU, and in any batch.

It is not bit-identical to PIL: Pillow (13) sometimes resamples in the other order, so a pixel whose sum lands near
a half in one order may round the other way: `MAX_LEVELS_FROM_PIL` grey level at most, a small fraction of pixels
(`tests/test_render.py` measures both against PIL on random boxes, upscales and downscales, and edge boxes).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from shared.augment import CANVAS, MIX_BOX, MIX_CANVAS, MIX_CROP, MIX_FLIP, MIX_LAMBDA, mix_images

BOXES, FLIP = "crop", "flip"  # A device-rendered batch's boxes and flips, as a cache names them, beside CANVAS.
# What a mixed batch adds (`shared.workers.render_rows`): its partners' canvases, boxes and flips, and CutMix's box.
PARTNER_INPUTS = (MIX_CANVAS, MIX_CROP, MIX_FLIP)
# Every array of a device-rendered batch that its views are rendered from (`with_inputs` and `inputs_of` read them).
DEVICE_INPUTS = (CANVAS, BOXES, FLIP, *PARTNER_INPUTS, MIX_LAMBDA, MIX_BOX)
# The measured agreement with PIL (`tests/test_render.py`), quoted by the docs: grey levels of uint8 pixels.
MAX_LEVELS_FROM_PIL = 1
MEAN_LEVELS_FROM_PIL = 0.1
_ONE = float(1 << 22)  # PIL's PRECISION_BITS for 8-bit images: 32 - 8 - 2.


def _axis_weights(start: jax.Array, length: jax.Array, size: int, extent: int) -> jax.Array:
  """float32 [B, size, extent], integers: output pixel i's weight of canvas pixel j along one axis in PIL's 22-bit
  fixed point, for boxes that start at `start` [B] and span `length` [B] pixels (a padding row's length 0 is taken
  as 1).

  PIL's triangle of half-width max(scale, 1) (scale = length / size box pixels per output pixel), centred on output
  pixel i's centre (i + 1/2) scale and sampled at box pixel centres, is (N - |D|)+ / N in integers: D = size (2 j' +
  1) - length (2 i + 1) for box pixel j', N = 2 max(length, size). Its weights normalised over the box, n / sum(n),
  are then quantised as PIL quantises them."""
  length = jnp.maximum(length, 1)[:, None, None]
  local = jnp.arange(extent, dtype=jnp.int32)[None, None, :] - start[:, None, None]  # [B, 1, E]
  i = jnp.arange(size, dtype=jnp.int32)[None, :, None]  # [1, S, 1]
  distance = jnp.abs(size * (2 * local + 1) - length * (2 * i + 1))  # [B, S, E]
  n = jnp.maximum(0, 2 * jnp.maximum(length, size) - distance) * ((local >= 0) & (local < length))
  total = jnp.maximum(jnp.sum(n, axis=-1, keepdims=True), 1)
  return jnp.floor(n.astype(jnp.float32) / total.astype(jnp.float32) * _ONE + 0.5)


def _pass(x: jax.Array, weights: jax.Array) -> jax.Array:
  """One resampling pass over the middle axis of x, float32 [B, E, K] integer pixels (0..255), with fixed-point
  `weights` [B, S, E]: [B, S, K], rounded half up and clipped to 0..255 exactly as PIL's integer sums are.

  Each weight (below 2**23) is split into pieces of p bits, p as large as keeps every partial sum an integer below
  2**24 (255 x (2**p - 1) x the taps of an output pixel, at most 2 ceil(E / S) + 1), so that the float32 matrix
  products are exact in any order; the pieces' sums are joined in int32 (below 2**31: 255 x 2**22 and the rounding).
  Views of 96 px canvases at 32 px take two pieces; of 4096 px at 8 px, four."""
  extent, size = x.shape[1], weights.shape[1]
  taps = 2 * -(-extent // size) + 1
  bits = int(np.log2((1 << 24) / (255 * taps) + 1))
  total = None
  for shift in range(0, 23, bits):
    piece = jnp.floor(weights / float(1 << shift)) - jnp.floor(weights / float(1 << (shift + bits))) * (1 << bits)
    part = jnp.einsum("bse,bek->bsk", piece, x, precision=jax.lax.Precision.HIGHEST).astype(jnp.int32) << shift
    total = part if total is None else total + part
  return jnp.clip((total + (1 << 21)) >> 22, 0, 255).astype(jnp.float32)


def render(canvas: jax.Array, boxes: jax.Array, flip: jax.Array, size: int) -> jax.Array:
  """The un-jitted `render_on_device` (for use inside another jitted function, such as the student's step).

  Args:
    canvas: uint8 [B, Hc, Wc, C] or [B, Hc, Wc].
    boxes: int [B, 4] (top, left, height, width) in canvas pixels.
    flip: bool [B].
    size: output side S (static).

  Returns:
    uint8 [B, S, S, C] (or [B, S, S]).
  """
  single = canvas.ndim == 3
  images = (canvas[..., None] if single else canvas).astype(jnp.float32)  # [B, Hc, Wc, C]
  count, height, width, channels = images.shape
  boxes = jnp.asarray(boxes, jnp.int32)
  rows = _axis_weights(boxes[:, 0], boxes[:, 2], size, height)  # [B, S, Hc]
  cols = _axis_weights(boxes[:, 1], boxes[:, 3], size, width)  # [B, S, Wc]
  # A flip reverses the output columns: the same weights, in reverse order.
  cols = jnp.where(jnp.asarray(flip)[:, None, None], cols[:, ::-1, :], cols)
  # PIL's horizontal pass (a uint8 image [B, Hc, S, C]), then its vertical pass; each a batched matrix product over
  # the axis it resamples, laid out as [B, that axis, the rest].
  across = _pass(jnp.transpose(images, (0, 2, 1, 3)).reshape(count, width, height * channels), cols)  # [B, S, Hc C]
  across = jnp.transpose(across.reshape(count, size, height, channels), (0, 2, 1, 3))  # [B, Hc, S, C]
  out = _pass(across.reshape(count, height, size * channels), rows).reshape(count, size, size, channels)
  out = out.astype(jnp.uint8)
  return out[..., 0] if single else out


@functools.partial(jax.jit, static_argnames="size")
def render_on_device(canvas: jax.Array, boxes: jax.Array, flip: jax.Array, size: int) -> jax.Array:
  """Renders crop views from canvases: each box cropped, resized to size x size (bilinear with antialiasing, as
  PIL on uint8) and flipped where drawn. Compiled once per (batch, canvas) shape and size.

  Args:
    canvas: uint8 [B, Hc, Wc, C] or [B, Hc, Wc]: each image at the top left of its canvas.
    boxes: int32 [B, 4] (top, left, height, width) in canvas pixels, each inside its image (a padding row's box of
      zeros renders its canvas's corner pixel).
    flip: bool [B]: flip the view horizontally.
    size: output side S.

  Returns:
    uint8 [B, S, S, C] (or [B, S, S]): what `shared.augment.render_crops` returns for the same boxes and flips,
    within `MAX_LEVELS_FROM_PIL` grey level per pixel
    (`MEAN_LEVELS_FROM_PIL` on average).
  """
  return render(canvas, boxes, flip, size)


def _views(batch: dict, size: int) -> jax.Array:
  """A device-rendered batch's views: its canvases' boxes rendered, and in a mixed batch (`mix_canvas` present) its
  partners' too, the two mixed by `shared.augment.mix_images` (the host's mixing code) with `mix_lambda` (and CutMix's
  `mix_box`)."""
  x = render(batch[CANVAS], batch[BOXES], batch[FLIP], size)
  if MIX_CANVAS not in batch:
    return x
  partner = render(batch[MIX_CANVAS], batch[MIX_CROP], batch[MIX_FLIP], size)
  return mix_images(x, partner, batch[MIX_LAMBDA], batch.get(MIX_BOX), xp=jnp)


_views_on_device = jax.jit(_views, static_argnames="size")


def with_inputs(batch: dict, size: int | None) -> dict:
  """The batch with its views rendered into `x` from its canvases (`canvas`, `crop`, `flip`, which it drops), as a
  step or forward sees it; a batch without canvases (host-rendered) as it is. Pure: use it inside a jitted function.

  Args:
    batch: a batch of `B` rows: `canvas` uint8 [B, Hc, Wc(, C)], `crop` int32 [B, 4] and `flip` bool [B] (device
      renderer), or `x` [B, ...] (host-rendered), and the rest of its arrays; a mixed batch also its partners'
      (`PARTNER_INPUTS`), `mix_lambda` float32 [B] and for CutMix `mix_box` int32 [B, 4].
    size: the views' side S (`Augmentation.image_size`); None for host-rendered views.

  Returns:
    The batch with `x` uint8 [B, S, S(, C)] (float32 mixed by mixup) in place of the canvases, boxes and flips (and
    the partners' and the box; `mix_lambda` stays, for the hard-label terms); the rest as they were.
  """
  if CANVAS not in batch:
    return batch
  rest = {k: v for k, v in batch.items() if k not in DEVICE_INPUTS or k == MIX_LAMBDA}
  return {**rest, "x": _views(batch, size)}


def inputs_of(batch: dict, size: int | None):
  """A rendered batch's inputs, outside a jitted function.

  Args:
    batch: as `with_inputs` takes it.
    size: the views' side S; None for host-rendered views.

  Returns:
    [B, ...]: its `x`, or (device renderer) its views rendered by `render_on_device`, uint8 [B, S, S(, C)] on the
    device (a mixed batch's mixed as `with_inputs` mixes them).
  """
  if CANVAS not in batch:
    return batch["x"]
  if MIX_CANVAS in batch:
    return _views_on_device({k: v for k, v in batch.items() if k in DEVICE_INPUTS}, size)
  return render_on_device(batch[CANVAS], batch[BOXES], batch[FLIP], size)
