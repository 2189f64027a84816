"""Camera images on the host: JPEG decode, resize with padding, and pi0.5's training augmentation.

Everything works on PIL images and uint8 numpy arrays [H, W, 3] with PIL's C routines; one CPU
core prepares ~200 DROID samples/s (two cameras each; see benchmarks/data_bench.py).

The augmentation follows openpi's pi0.5 `preprocess_observation` (augmax there, PIL here):
non-wrist cameras get a random crop to 95% of each side resized back, then a rotation in
[-5, 5] degrees; every camera then gets colour jitter (brightness 0.3, contrast 0.4,
saturation 0.5), all after the resize with padding to 224x224. For the base camera,
`prepare_image` composes resize, crop and rotation into one affine resampling of the decoded
frame (rotation alone cost 2 ms as a separate PIL pass); `augment` is the step-by-step
reference it is tested against.
"""

import io

import numpy as np
from PIL import Image, ImageEnhance

CROP_FRACTION = 0.95
MAX_ROTATION_DEGREES = 5.0
BRIGHTNESS = 0.3
CONTRAST = 0.4
SATURATION = 0.5


class CorruptImageError(ValueError):
  """The bytes are not a decodable image."""


def decode_jpeg(data: bytes) -> Image.Image:
  """Decodes JPEG (or any PIL-readable) bytes into an RGB PIL image.

  Raises:
    CorruptImageError: the bytes are empty, truncated or not an image.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
    raise CorruptImageError(f"expected non-empty image bytes, got {type(data).__name__}")
  try:
    image = Image.open(io.BytesIO(data))
    # `load` forces the full decode here, so truncated data fails now, not later in a resize.
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {error}") from error
  if image.mode != "RGB":
    image = image.convert("RGB")
  return image


def resize_with_pad(image: Image.Image, height: int, width: int) -> Image.Image:
  """Resizes keeping the aspect ratio, then centres it on a black [height, width] canvas.

  Same arithmetic as openpi's `image_tools.resize_with_pad` (PIL path, bilinear), so a
  180x320 DROID frame becomes a 224x126 band centred in 224x224 exactly as at inference.
  """
  current_width, current_height = image.size
  if (current_width, current_height) == (width, height):
    return image
  ratio = max(current_width / width, current_height / height)
  resized_height = int(current_height / ratio)
  resized_width = int(current_width / ratio)
  resized = image.resize((resized_width, resized_height), resample=Image.BILINEAR)
  canvas = Image.new(resized.mode, (width, height), 0)
  offset = (max(0, (width - resized_width) // 2), max(0, (height - resized_height) // 2))
  canvas.paste(resized, offset)
  return canvas


def _random_geometry(rng: np.random.Generator, size: int) -> tuple[int, int, int, float]:
  """(crop side, left, top, rotation degrees) of pi0.5's crop-and-rotate, on a size x size image."""
  crop = int(size * CROP_FRACTION)
  left = int(rng.integers(0, size - crop + 1))
  top = int(rng.integers(0, size - crop + 1))
  return crop, left, top, float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))


def jitter_colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Random brightness, contrast and saturation factors in [1 - s, 1 + s] (openpi's strengths)."""
  brightness, contrast, saturation = rng.uniform(
    [1 - BRIGHTNESS, 1 - CONTRAST, 1 - SATURATION], [1 + BRIGHTNESS, 1 + CONTRAST, 1 + SATURATION]
  )
  image = ImageEnhance.Brightness(image).enhance(float(brightness))
  image = ImageEnhance.Contrast(image).enhance(float(contrast))
  return ImageEnhance.Color(image).enhance(float(saturation))


def augment(image: Image.Image, rng: np.random.Generator, *, geometric: bool) -> Image.Image:
  """pi0.5's augmentation on an already resized square image, step by step as openpi orders it:
  crop 95%, resize back, rotate, colour jitter; `geometric=False` (wrist) is colour only.

  `prepare_image` fuses the geometric steps with the resize into one resampling (same random
  draws, same geometry, a third of the time); this function is the reference it is tested against.
  """
  if geometric:
    size = image.size[0]
    crop, left, top, angle = _random_geometry(rng, size)
    image = image.crop((left, top, left + crop, top + crop))
    image = image.resize((size, size), resample=Image.BILINEAR)
    image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
  return jitter_colour(image, rng)


def resize_crop_rotate(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
  """resize_with_pad -> crop -> resize -> rotate as ONE affine resampling of the source image.

  Output pixel u (continuous coordinates, centre of [0, size)^2) is rotated about the centre,
  mapped into the crop window of the padded image, then from the padded image back to the source.
  Composing the maps costs one bilinear pass instead of three, and interpolates once.
  """
  width, height = image.size
  ratio = max(width / size, height / size)
  resized_width, resized_height = int(width / ratio), int(height / ratio)
  pad = np.array([(size - resized_width) // 2, (size - resized_height) // 2], np.float64)
  to_source = np.diag([width / resized_width, height / resized_height])
  crop, left, top, angle = _random_geometry(rng, size)
  to_padded = np.eye(2) * (crop / size)
  radians = np.deg2rad(angle)
  # PIL's rotate(angle) (counter-clockwise on screen, y pointing down) samples its input at
  # centre + R (u - centre) with this R.
  rotation = np.array([[np.cos(radians), -np.sin(radians)], [np.sin(radians), np.cos(radians)]])
  centre = np.array([size / 2, size / 2])
  linear = to_source @ to_padded @ rotation
  offset = to_source @ (np.array([left, top]) + to_padded @ (centre - rotation @ centre) - pad)
  coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
  return image.transform(
    (size, size), Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=(0, 0, 0)
  )


def prepare_image(
  data: bytes,
  *,
  size: int,
  rng: np.random.Generator | None,
  geometric: bool,
) -> np.ndarray:
  """JPEG bytes -> uint8 [size, size, 3]: decode, resize with padding, augment when `rng` is given.

  Raises:
    CorruptImageError: the bytes do not decode.
  """
  image = decode_jpeg(data)
  if rng is not None and geometric:
    image = jitter_colour(resize_crop_rotate(image, size, rng), rng)
  else:
    image = resize_with_pad(image, size, size)
    if rng is not None:
      image = jitter_colour(image, rng)
  return np.asarray(image, dtype=np.uint8)
