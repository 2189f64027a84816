"""Camera images on the host: JPEG decode, resize with padding, and pi0.5's training augmentation.

Everything works on PIL images and uint8 numpy arrays [H, W, 3]: PIL's C routines decode, resize,
rotate and colour-adjust a 224x224 image in well under a millisecond, which is what lets one CPU
core feed ~100 samples/s (see benchmarks/data_bench.py).

The augmentation follows openpi's pi0.5 `preprocess_observation` (augmax there, PIL here):
non-wrist cameras get a random crop to 95% of each side resized back, then a rotation in
[-5, 5] degrees; every camera then gets colour jitter (brightness 0.3, contrast 0.4,
saturation 0.5). openpi applies it after resizing to 224x224, and so do we.
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


def augment(image: Image.Image, rng: np.random.Generator, *, geometric: bool) -> Image.Image:
  """pi0.5's training augmentation; `geometric=False` (wrist camera) gives colour jitter only."""
  if geometric:
    width, height = image.size
    crop_width, crop_height = int(width * CROP_FRACTION), int(height * CROP_FRACTION)
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    image = image.crop((left, top, left + crop_width, top + crop_height))
    image = image.resize((width, height), resample=Image.BILINEAR)
    angle = float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
  brightness, contrast, saturation = rng.uniform(
    [1 - BRIGHTNESS, 1 - CONTRAST, 1 - SATURATION], [1 + BRIGHTNESS, 1 + CONTRAST, 1 + SATURATION]
  )
  image = ImageEnhance.Brightness(image).enhance(float(brightness))
  image = ImageEnhance.Contrast(image).enhance(float(contrast))
  image = ImageEnhance.Color(image).enhance(float(saturation))
  return image


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
  image = resize_with_pad(decode_jpeg(data), size, size)
  if rng is not None:
    image = augment(image, rng, geometric=geometric)
  return np.asarray(image, dtype=np.uint8)
