"""A natural-image-like test set with a learnable class structure, written as an `imagefolder:` tree.

Each image is one filled shape (the class) in a random bright colour, size, position and rotation, on a darker textured
background (a colour gradient with stripes at a random angle and period, and pixel noise), saved as a JPEG whose
width and height are drawn independently (non-square, 40-160 px by default). The class is the shape alone: colour,
background and framing vary independently of it, so a model must learn shapes, and random-resized crops can cut a
shape off, as crops of natural images do.

`write_shapes(out)` writes `out/train/<class>/<n>.jpg` and `out/test/<class>/<n>.jpg`; each image is a pure
function of (seed, split, class, n), so a tree can be regenerated bit for bit.
"""

import dataclasses
import os

import numpy as np

CLASSES = ("bar", "circle", "cross", "hexagon", "pentagon", "ring", "square", "star", "triangle", "trapezoid")
SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShapesConfig:
  """What `write_shapes` writes.

  Attributes:
    train_per_class: training images per class.
    test_per_class: test images per class.
    min_side, max_side: range of each image's width and height, in pixels.
    seed: seeds every image.
    quality: JPEG quality.
  """

  train_per_class: int = 300
  test_per_class: int = 60
  min_side: int = 40
  max_side: int = 160
  seed: int = 0
  quality: int = 90


def _outline(name: str, rng: np.random.Generator) -> np.ndarray:
  """The class's polygon on the unit disc, float [P, 2] (x, y); a circle or ring is a 64-gon."""
  def regular(sides, radius=1.0, start=0.0):
    angles = start + 2 * np.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=-1)

  if name in ("circle", "ring"):
    return regular(64)
  if name == "square":
    return regular(4, start=np.pi / 4)
  if name == "triangle":
    return regular(3, start=-np.pi / 2)
  if name == "pentagon":
    return regular(5, start=-np.pi / 2)
  if name == "hexagon":
    return regular(6)
  if name == "star":
    outer, inner = regular(5, 1.0, -np.pi / 2), regular(5, 0.42, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)
  if name == "cross":
    a, b = 0.3, 1.0
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                     [-b, -a], [-a, -a]])
  if name == "bar":
    return np.array([[-1.0, -0.25], [1.0, -0.25], [1.0, 0.25], [-1.0, 0.25]])
  if name == "trapezoid":
    return np.array([[-1.0, 0.55], [1.0, 0.55], [0.45, -0.55], [-0.45, -0.55]])
  raise ValueError(name)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """float [H, W, 3] in 0..255: a gradient between two colours, stripes at a random angle and period, noise."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  a, b = rng.uniform(0, 150, 3), rng.uniform(0, 150, 3)  # Darker than any shape (see `render_shape`).
  angle = rng.uniform(0, np.pi)
  along = (x * np.cos(angle) + y * np.sin(angle)) / max(height, width)
  image = a + (b - a) * np.clip(along, 0, 1)[..., None]
  period, stripe_angle = rng.uniform(4, 16), rng.uniform(0, np.pi)
  stripes = np.sin(2 * np.pi * (x * np.cos(stripe_angle) + y * np.sin(stripe_angle)) / period)
  image += rng.uniform(5, 25) * stripes[..., None] * rng.uniform(-1, 1, 3)
  image += rng.normal(0, rng.uniform(3, 15), size=image.shape)
  return image


def render_shape(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """One image, uint8 [H, W, 3]: a shape of class `name` on a textured background."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  image = _background(rng, height, width)
  side = min(height, width)
  radius = rng.uniform(0.28, 0.45) * side
  centre = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
  angle = rng.uniform(0, 2 * np.pi)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  outline = _outline(name, rng) @ rotation.T * radius + centre
  mask = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(mask)
  draw.polygon([tuple(p) for p in outline], fill=255)
  if name == "ring":
    draw.polygon([tuple(p) for p in (_outline("circle", rng) * 0.55) @ rotation.T * radius + centre], fill=0)
  # Any hue, but brighter than the background: the shape's outline, not its colour, tells the class.
  colour = rng.uniform(0, 255, 3)
  colour = colour + (230 - colour.mean()) * rng.uniform(0.5, 1.0)
  alpha = np.asarray(mask, np.float32)[..., None] / 255
  image = image * (1 - alpha) + (colour + rng.normal(0, 6, size=image.shape)) * alpha
  return np.clip(image, 0, 255).astype(np.uint8)


def write_shapes(out: str, config: ShapesConfig = ShapesConfig(), progress: bool = False) -> dict[str, int]:
  """Writes the train and test trees under `out`; returns the number of images per split.

  Raises:
    FileExistsError: `out` exists and is not empty (nothing is overwritten).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from shared.log import progress as progress_bar  # pylint: disable=import-outside-toplevel
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"{out!r} exists and is not empty; choose a new folder")
  counts = {"train": config.train_per_class, "test": config.test_per_class}
  total = sum(counts.values()) * len(CLASSES)
  with progress_bar(total=total, desc=f"writing {out}", unit="image", enabled=progress) as bar:
    for split, per_class in counts.items():
      for label, name in enumerate(CLASSES):
        folder = os.path.join(out, split, name)
        os.makedirs(folder, exist_ok=True)
        for n in range(per_class):
          rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split], label, n])
          height, width = rng.integers(config.min_side, config.max_side + 1, size=2)
          image = render_shape(name, rng, int(height), int(width))
          Image.fromarray(image).save(os.path.join(folder, f"{n:05d}.jpg"), quality=config.quality)
          bar.update(1)
  return {split: per_class * len(CLASSES) for split, per_class in counts.items()}
